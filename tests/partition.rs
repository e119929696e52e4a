//! A cluster across hosts under faults: three gateway hosts (network namespaces on one
//! bridge, see tests/common/netns.rs), each with one member of a 3-member etcd cluster
//! (etcd's default timing: heartbeat 100 ms, election 1 s) and one Comet node whose
//! `etcd_addr` lists its own member first; the test process is the fourth host, with the
//! message server, the monitor and the clients; a fifth host runs a second monitor where
//! a test asks for one. Faults: SIGKILL, SIGTERM, a host cut off (its port on the bridge
//! down), etcd members killed, quorum lost, the monitor cut off, two monitors, and a
//! quiet minute. The whole file takes about 105 s. Nodes run with `etcd_lease_ttl=3` and
//! `etcd_keepalive_interval=1s`. Every test skips with a message where namespaces cannot
//! be made (not root, no `ip`).
//!
//! The figures asserted are each test's own; the worst registration gap a test sees
//! (`longest_renewal_gap_ms` of `Server.Status`) is printed as `GAP` for README.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::etcd::{self, Etcd};
use common::netns::{self, Net};
use common::{MessageServer, Monitor, Rpc, temp_dir, wait_until};
use serde_json::{Value, json};

/// The lease TTL the nodes run with.
const TTL: Duration = Duration::from_secs(3);
const GATEWAYS: usize = 3;
/// The host with nothing but a second monitor, when a test starts one.
const MONITOR_HOST: usize = GATEWAYS;
/// The longest a healthy node may go without renewing its lease when a member it uses
/// fails but a leader remains: TTL/2 plus 0.5 s of margin for a busy machine.
const FAIL_OVER_GAP: Duration = Duration::from_millis(2000);
/// The same when the leader is lost: nobody can renew until the others elect a new one
/// (etcd's default election timeout, 1 s, randomized up to 2 s), then the new leader
/// extends every lease by its TTL, so the key is safe as long as the node renews within
/// a TTL of the election; the keys are checked for that. The gap itself is etcd's
/// election plus up to one keepalive interval before and one probe round after it:
/// 1.5-2.5 s on an idle machine, but a CI run on a loaded machine measured just over
/// 3 s with every key kept, so the bound here only catches a node that stopped trying.
const ELECTION_GAP: Duration = Duration::from_secs(6);

/// At most this many clusters run at once: each is 3 etcd members and 3 nodes, and
/// with all ten tests side by side on two cores etcd (100 ms heartbeats) missed
/// heartbeats and renewals stalled for 2.9 s for want of CPU, not for any fault.
const CLUSTERS_AT_ONCE: usize = 2;

/// A place among the [`CLUSTERS_AT_ONCE`] running clusters, held until dropped.
struct Slot;

static SLOTS: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

impl Slot {
    fn take() -> Slot {
        let (running, freed) = &SLOTS;
        let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
        while *running >= CLUSTERS_AT_ONCE {
            running = freed.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        *running += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (running, freed) = &SLOTS;
        *running.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        freed.notify_one();
    }
}

/// A Comet node on one gateway host.
struct Node {
    child: Option<Child>,
    log: PathBuf,
    addr: std::net::Ipv4Addr,
}

impl Node {
    fn start(net: &Net, host: usize, members: &[Etcd], rpc_api_url: &str) -> Node {
        // The local member first, as an operator would list it.
        let mut endpoints: Vec<String> = vec![members[host].endpoint()];
        endpoints.extend(
            (0..members.len())
                .filter(|&m| m != host)
                .map(|m| members[m].endpoint()),
        );
        let addr = net.host(host).addr;
        let ini = format!(
            "max_proc=1\ncomet_service_name=comet\netcd_addr={}\netcd_lease_ttl={}\n\
             etcd_keepalive_interval=1s\nrpc_api_url={rpc_api_url}\n\
             rpc_user_agent=\"CtxImRpc 1.0\"\nsocket_protocol=websocket\n\
             websocket_host={addr}\nwebsocket_port=:8000\nrpc_addr={addr}:7000\ndrain_window=0\n\
             heartbeat_timeout=60s\n",
            endpoints.join(","),
            TTL.as_secs()
        );
        let dir = temp_dir("netnode");
        let config = dir.join("comet.ini");
        std::fs::write(&config, ini).unwrap();
        let log = dir.join("comet.log");
        let child = net
            .command(host, &common::comet_binary())
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "info,comet::control::etcd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Node {
            child: Some(child),
            log,
            addr,
        }
    }

    fn key(&self) -> String {
        format!("/comet/{}:7000", self.addr)
    }

    /// The conn_id of the test's client on this node.
    fn conn_id(&self) -> String {
        format!("client{}", self.addr.octets()[3])
    }

    fn ws(&self) -> SocketAddr {
        (self.addr, 8000).into()
    }

    fn status(&self) -> Option<Value> {
        let stream = netns::connect((self.addr, 7000).into(), Duration::from_secs(1)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let reply = Rpc::from_stream(stream).try_call("Server.Status", json!({}))?;
        Some(reply["result"]["data"]["registration"].clone())
    }

    /// The longest time between two renewals of the node's lease so far.
    fn longest_gap(&self) -> Duration {
        let status = self.status().expect("node answers Server.Status");
        Duration::from_millis(status["longest_renewal_gap_ms"].as_u64().unwrap())
    }

    fn signal(&mut self, signal: &str) {
        common::signal(self.child.as_ref().unwrap().id(), signal);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> bool {
        let exited = wait_until(limit, || {
            self.child
                .as_mut()
                .is_none_or(|c| c.try_wait().unwrap().is_some())
        });
        if exited {
            self.child.take();
        }
        exited
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A monitor on a host of its own.
struct HostMonitor {
    child: Option<Child>,
    log: PathBuf,
}

impl HostMonitor {
    fn start(cluster: &Cluster, host: usize) -> HostMonitor {
        let all: Vec<String> = cluster.members.iter().map(Etcd::endpoint).collect();
        let dir = temp_dir("netmonitor");
        let config = dir.join("comet.ini");
        let ini = format!(
            "comet_service_name=comet\netcd_addr={}\nrpc_api_url={}\ncallback_retries=20\n",
            all.join(","),
            cluster.rpc_api_url
        );
        std::fs::write(&config, ini).unwrap();
        let log = dir.join("monitor.log");
        let child = cluster
            .net
            .command(host, &common::comet_binary())
            .arg("-m")
            .arg("-c")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        HostMonitor {
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HostMonitor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three gateway hosts with their members and nodes, the message server and a monitor.
/// Fields drop in order: processes first, the network last.
struct Cluster {
    nodes: Vec<Node>,
    monitors: Vec<Monitor>,
    members: Vec<Etcd>,
    server: MessageServer,
    /// What the hosts use as `rpc_api_url`: the message server through the test's link.
    rpc_api_url: String,
    net: Net,
    _slot: Slot,
}

impl Cluster {
    /// The cluster with every node announced once; `None` (test skipped) without
    /// namespaces.
    fn start(monitors: usize) -> Option<Cluster> {
        let slot = Slot::take();
        let net = Net::create(GATEWAYS + 1)?;
        let members = Etcd::cluster_on(&net, &[0, 1, 2]);
        let server = MessageServer::start();
        let rpc_api_url = net.expose_url(&server.url());
        let all: Vec<String> = members.iter().map(Etcd::endpoint).collect();
        let monitors = (0..monitors)
            .map(|_| Monitor::start(&server, &all.join(",")))
            .collect();
        let nodes = (0..GATEWAYS)
            .map(|h| Node::start(&net, h, &members, &rpc_api_url))
            .collect();
        let cluster = Cluster {
            nodes,
            monitors,
            members,
            server,
            rpc_api_url,
            net,
            _slot: slot,
        };
        for node in &cluster.nodes {
            let key = node.key();
            assert!(
                wait_until(Duration::from_secs(20), || cluster.additions(&key) >= 1),
                "{key} not announced: {}",
                node.log_text()
            );
        }
        Some(cluster)
    }

    fn leader(&self) -> usize {
        let mut leader = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                leader = self.members.iter().position(Etcd::is_leader);
                leader.is_some()
            }),
            "no etcd leader"
        );
        leader.unwrap()
    }

    fn removals(&self, key: &str) -> usize {
        self.server
            .calls_of("removeCometServer")
            .iter()
            .filter(|c| c.arg(0) == key)
            .count()
    }

    fn additions(&self, key: &str) -> usize {
        self.server
            .calls_of("addCometServer")
            .iter()
            .filter(|c| c.arg(0) == key)
            .count()
    }

    /// Endpoints of the members other than those on `hosts`.
    fn endpoints_except(&self, hosts: &[usize]) -> Vec<String> {
        (0..self.members.len())
            .filter(|m| !hosts.contains(m))
            .map(|m| self.members[m].endpoint())
            .collect()
    }

    /// Asserts that each node but those on `hosts` still has its key, was never
    /// removed, and renewed its lease within `TTL / 2 + 0.5 s`; returns the worst gap.
    fn assert_untouched_except(&self, hosts: &[usize], fault: &str) -> Duration {
        self.assert_kept_except(hosts, fault, Some(FAIL_OVER_GAP))
    }

    /// Like [`Cluster::assert_untouched_except`], with the gap bounded by `max_gap` if
    /// given: an etcd election leaves no leader to renew leases with, and its new leader
    /// extends every lease, so then only the keys are checked.
    fn assert_kept_except(
        &self,
        hosts: &[usize],
        fault: &str,
        max_gap: Option<Duration>,
    ) -> Duration {
        let reachable = self.endpoints_except(hosts);
        let mut worst = Duration::ZERO;
        for (h, node) in self.nodes.iter().enumerate() {
            if hosts.contains(&h) {
                continue;
            }
            let key = node.key();
            assert_eq!(
                self.removals(&key),
                0,
                "{fault}: healthy {key} announced removed"
            );
            // Asked until etcd answers: during an election it answers nothing.
            assert!(
                wait_until(Duration::from_secs(5), || etcd::key(&reachable, &key)
                    .is_some()),
                "{fault}: healthy {key} lost its key: {}",
                node.log_text()
            );
            let gap = node.longest_gap();
            assert!(
                max_gap.is_none_or(|max| gap < max),
                "{fault}: {key} went {gap:?} without renewing its lease: {}",
                node.log_text()
            );
            worst = worst.max(gap);
        }
        println!("GAP {fault}: worst registration gap of a healthy node {worst:?}");
        worst
    }
}

fn push_reaches(node: &Node, client: &mut common::Client, text: &str) -> bool {
    let stream = netns::connect((node.addr, 7000).into(), Duration::from_secs(1)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rpc = Rpc::from_stream(stream);
    rpc.push(&[&node.conn_id()], text, "")["result"] == json!("ok")
        && common::next_text(client).as_deref() == Some(text)
}

fn connect_client(node: &Node) -> common::Client {
    let stream = netns::connect(node.ws(), Duration::from_secs(2)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t = json!({"conn_id": node.conn_id(), "token": "t", "info": ""}).to_string();
    let url = format!("ws://{}/ws?t={}", node.ws(), common::url_encode(&t));
    match tungstenite::client::client(url, stream) {
        Ok((socket, _)) => socket,
        Err(err) => panic!("client: {err:?}"),
    }
}

/// SIGKILL: the node's key goes with its lease; one `removeCometServer` within
/// TTL + 2 s (measured 3.0-3.3 s), none for the others.
#[test]
fn sigkilled_node_is_removed_once_within_ttl_plus_two_seconds() {
    let Some(mut cluster) = Cluster::start(1) else {
        return;
    };
    let key = cluster.nodes[0].key();
    let killed = Instant::now();
    cluster.nodes[0].kill();
    assert!(wait_until(TTL + Duration::from_secs(5), || cluster
        .removals(&key)
        == 1));
    let took = killed.elapsed();
    println!("SIGKILL: removeCometServer after {took:?}");
    assert!(
        took <= TTL + Duration::from_secs(2),
        "removal after {took:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.removals(&key), 1, "exactly one removal");
    cluster.assert_untouched_except(&[0], "SIGKILL");
}

/// SIGTERM: the key is revoked at once, one removal within 2 s, never put back.
#[test]
fn sigterm_removes_the_node_once_at_once() {
    let Some(mut cluster) = Cluster::start(1) else {
        return;
    };
    let key = cluster.nodes[1].key();
    let signalled = Instant::now();
    cluster.nodes[1].signal("TERM");
    assert!(wait_until(Duration::from_secs(5), || cluster
        .removals(&key)
        == 1));
    let took = signalled.elapsed();
    println!("SIGTERM: removeCometServer after {took:?}");
    assert!(took <= Duration::from_secs(2), "removal after {took:?}");
    assert!(cluster.nodes[1].wait_exit(Duration::from_secs(10)));
    std::thread::sleep(TTL);
    assert_eq!(cluster.additions(&key), 1, "never announced again");
    assert_eq!(cluster.removals(&key), 1);
    cluster.assert_untouched_except(&[1], "SIGTERM");
}

/// A gateway host cut off for 8 s: its own node loses its key (it cannot reach a
/// majority: one removal, correct), every other node keeps its key with a gap under
/// [`FAIL_OVER_GAP`] ([`ELECTION_GAP`] when the leader's host is cut), and after the heal the cut-off node is back, announced once more,
/// within 10 s.
fn cut_a_host(leader: bool) {
    let Some(cluster) = Cluster::start(1) else {
        return;
    };
    let current = cluster.leader();
    let host = if leader {
        current
    } else {
        (current + 1) % GATEWAYS
    };
    let fault = if leader {
        "leader host cut off"
    } else {
        "follower host cut off"
    };
    let key = cluster.nodes[host].key();
    cluster.net.cut(host);
    let cut = Instant::now();
    assert!(
        wait_until(TTL + Duration::from_secs(6), || cluster.removals(&key) == 1),
        "{fault}: the cut-off node's lease must expire"
    );
    println!("{fault}: cut-off node removed after {:?}", cut.elapsed());
    std::thread::sleep(Duration::from_secs(8).saturating_sub(cut.elapsed()));
    let max_gap = if leader { ELECTION_GAP } else { FAIL_OVER_GAP };
    cluster.assert_kept_except(&[host], fault, Some(max_gap));
    cluster.net.heal(host);
    let healed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || cluster.additions(&key) == 2),
        "{fault}: not back after the heal: {}",
        cluster.nodes[host].log_text()
    );
    println!(
        "{fault}: re-announced {:?} after the heal",
        healed.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.additions(&key), 2, "announced once after the heal");
    assert_eq!(cluster.removals(&key), 1);
    // Without `--pre-vote` (etcd 3.4's default) the healed member's higher term forces
    // an election: for about 2 s nobody can renew, but no lease expires either.
    cluster.assert_kept_except(&[host], &format!("{fault}, after the heal"), None);
}

#[test]
fn a_followers_host_cut_off_costs_only_its_own_node() {
    cut_a_host(false);
}

/// The case of issue 17: the other nodes' keepalives, forwarded to the cut-off leader,
/// hang; they must move on and keep their keys.
#[test]
fn the_leaders_host_cut_off_costs_only_its_own_node() {
    cut_a_host(true);
}

/// An etcd member SIGKILLed for 6 s: no node loses its key or is announced removed
/// (the node beside the dead member fails over), gap under [`FAIL_OVER_GAP`]
/// ([`ELECTION_GAP`] for the leader).
fn kill_a_member(leader: bool) {
    let Some(mut cluster) = Cluster::start(1) else {
        return;
    };
    let current = cluster.leader();
    let member = if leader {
        current
    } else {
        (current + 1) % GATEWAYS
    };
    let fault = if leader {
        "leader member killed"
    } else {
        "follower member killed"
    };
    cluster.members[member].kill();
    std::thread::sleep(Duration::from_secs(6));
    let max_gap = if leader { ELECTION_GAP } else { FAIL_OVER_GAP };
    cluster.assert_kept_except(&[], fault, Some(max_gap));
    cluster.members[member].restart();
    std::thread::sleep(Duration::from_secs(2));
    cluster.assert_kept_except(&[], &format!("{fault}, after the restart"), None);
    for node in &cluster.nodes {
        assert_eq!(cluster.additions(&node.key()), 1, "{fault}: re-announced");
    }
}

#[test]
fn killing_the_leader_member_removes_no_node() {
    kill_a_member(true);
}

#[test]
fn killing_a_follower_member_removes_no_node() {
    kill_a_member(false);
}

/// Two of three members down for 10 s: no client is lost, no callback at all is made
/// (no offline, no removal), `Server.Status` stops saying "registered" within TTL + 2 s
/// (a leader that lost its quorum still renews leases until its election timeout, 1 s,
/// runs out; measured 2.8-3.9 s), and within 10 s of the quorum's return every node says
/// "registered" again.
#[test]
fn quorum_lost_for_ten_seconds_loses_no_client_and_makes_no_callback() {
    let Some(mut cluster) = Cluster::start(1) else {
        return;
    };
    let mut clients: Vec<common::Client> = cluster.nodes.iter().map(connect_client).collect();
    for (node, client) in cluster.nodes.iter().zip(clients.iter_mut()) {
        assert!(push_reaches(node, client, "before"));
    }
    for node in &cluster.nodes {
        assert!(wait_until(Duration::from_secs(5), || cluster
            .server
            .count("online", &node.conn_id())
            == 1));
    }
    let calls_before = cluster.server.calls().len();
    cluster.members[1].kill();
    cluster.members[2].kill();
    let lost = Instant::now();
    assert!(
        wait_until(TTL + Duration::from_secs(2), || cluster.nodes[0]
            .status()
            .is_some_and(|s| s["state"]
                .as_str()
                .unwrap()
                .starts_with("unknown"))),
        "Status must stop saying registered: {:?}",
        cluster.nodes[0].status()
    );
    println!(
        "quorum lost: Status says unknown after {:?}",
        lost.elapsed()
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(lost.elapsed()));
    cluster.members[1].restart();
    cluster.members[2].restart();
    let back = Instant::now();
    for node in &cluster.nodes {
        assert!(
            wait_until(Duration::from_secs(10), || node
                .status()
                .is_some_and(|s| s["state"] == json!("registered"))),
            "{}: {}",
            node.key(),
            node.log_text()
        );
    }
    println!(
        "quorum back: every node registered after {:?}",
        back.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    let calls: Vec<String> = cluster.server.calls()[calls_before..]
        .iter()
        .map(|c| format!("{} {:?}", c.method, c.args))
        .collect();
    assert!(calls.is_empty(), "spurious callbacks: {calls:?}");
    for (node, client) in cluster.nodes.iter().zip(clients.iter_mut()) {
        assert!(push_reaches(node, client, "after"), "client lost");
    }
}

/// A quiet cluster for 60 s (ten to fifteen of the old 4-6 s break intervals): zero
/// watch breaks, no re-announcement.
#[test]
fn the_monitors_watch_stays_open_for_a_quiet_minute() {
    const QUIET: Duration = Duration::from_secs(60);
    let Some(cluster) = Cluster::start(1) else {
        return;
    };
    std::thread::sleep(QUIET);
    let log = cluster.monitors[0].log_text();
    assert_eq!(
        log.matches("watch interrupted").count(),
        0,
        "the watch broke during {QUIET:?}: {log}"
    );
    for node in &cluster.nodes {
        assert_eq!(cluster.additions(&node.key()), 1);
        assert_eq!(cluster.removals(&node.key()), 0);
    }
}

/// The monitor's host (here: the test process) cut off from every member for 8 s while
/// a node is SIGKILLed: the message server hears nothing during the cut, then exactly
/// one removal of the killed node within 15 s of the heal, and nothing about the others.
#[test]
fn a_monitor_cut_off_from_etcd_reports_what_it_missed_once_after_the_heal() {
    let Some(mut cluster) = Cluster::start(1) else {
        return;
    };
    let calls_before = cluster.server.calls().len();
    let key = cluster.nodes[2].key();
    cluster.net.cut_outside();
    cluster.nodes[2].kill();
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        cluster.server.calls().len(),
        calls_before,
        "nothing can be announced while cut off"
    );
    cluster.net.heal_outside();
    let healed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || cluster.removals(&key) == 1),
        "{}",
        cluster.monitors[0].log_text()
    );
    println!(
        "monitor cut off: removal {:?} after the heal",
        healed.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.removals(&key), 1);
    for node in &cluster.nodes[..2] {
        assert_eq!(cluster.removals(&node.key()), 0);
        assert_eq!(cluster.additions(&node.key()), 1, "not re-announced");
    }
}

/// Two monitors are two independent announcers: the message server gets every
/// `addCometServer` and `removeCometServer` twice, once from each.
#[test]
fn two_monitors_announce_every_change_twice() {
    let Some(mut cluster) = Cluster::start(2) else {
        return;
    };
    for node in &cluster.nodes {
        assert!(wait_until(Duration::from_secs(10), || cluster
            .additions(&node.key())
            == 2));
    }
    let key = cluster.nodes[0].key();
    cluster.nodes[0].kill();
    assert!(wait_until(TTL + Duration::from_secs(5), || cluster
        .removals(&key)
        == 2));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.removals(&key), 2);
}

/// Two monitors, the second on a host of its own that is cut off for 8 s while a node is
/// SIGKILLed: the message server gets the removal from the first monitor within
/// TTL + 2 s, then the same removal a second time from the cut-off one within 15 s of
/// the heal, and nothing about the other nodes.
#[test]
fn with_two_monitors_the_cut_off_one_repeats_the_removal_after_the_heal() {
    let Some(mut cluster) = Cluster::start(1) else {
        return;
    };
    let second = HostMonitor::start(&cluster, MONITOR_HOST);
    for node in &cluster.nodes {
        assert!(
            wait_until(Duration::from_secs(10), || cluster.additions(&node.key())
                == 2),
            "{}",
            second.log_text()
        );
    }
    let key = cluster.nodes[0].key();
    cluster.net.cut(MONITOR_HOST);
    let killed = Instant::now();
    cluster.nodes[0].kill();
    assert!(wait_until(TTL + Duration::from_secs(5), || cluster
        .removals(&key)
        == 1));
    let first_after = killed.elapsed();
    println!("two monitors: first removal after {first_after:?}");
    assert!(first_after <= TTL + Duration::from_secs(2));
    std::thread::sleep(Duration::from_secs(8).saturating_sub(killed.elapsed()));
    assert_eq!(
        cluster.removals(&key),
        1,
        "the cut-off monitor announced nothing"
    );
    cluster.net.heal(MONITOR_HOST);
    let healed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || cluster.removals(&key) == 2),
        "removals {}; cut-off monitor: {}\nother monitor: {}",
        cluster.removals(&key),
        second.log_text(),
        cluster.monitors[0].log_text()
    );
    println!(
        "two monitors: second removal {:?} after the heal",
        healed.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cluster.removals(&key), 2);
    for node in &cluster.nodes[1..] {
        assert_eq!(cluster.removals(&node.key()), 0);
        assert_eq!(cluster.additions(&node.key()), 2, "not re-announced");
    }
}
