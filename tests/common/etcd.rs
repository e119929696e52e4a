//! Real etcd servers for the tests (Debian's etcd-server): single members or clusters on
//! free loopback ports with temporary data directories, or one member per host of a
//! [`Net`] (etcd's default timing there), killable and restartable, plus a small
//! blocking view of their keys and their leader through etcd-client.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};

use super::netns::Net;
use super::{free_port, temp_dir, wait_until};

/// One etcd member.
pub struct Etcd {
    child: Option<Child>,
    name: String,
    pub client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    initial_cluster: String,
    /// The address it listens on.
    host: String,
    /// The network namespace it runs in; `None`: this one, on loopback with the tests'
    /// fast election timing.
    netns: Option<String>,
}

impl Etcd {
    /// A single-member cluster.
    pub fn start() -> Etcd {
        Etcd::cluster(1).pop().unwrap()
    }

    /// A single member on a given client port (one chosen before etcd was started).
    pub fn started_on(client_port: u16) -> Etcd {
        let peer_port = free_port();
        let name = format!("m{client_port}");
        let mut member = Etcd {
            child: None,
            initial_cluster: format!("{name}=http://127.0.0.1:{peer_port}"),
            name,
            client_port,
            peer_port,
            data_dir: temp_dir("etcd"),
            host: "127.0.0.1".to_owned(),
            netns: None,
        };
        member.spawn();
        assert!(
            member.wait_healthy(Duration::from_secs(20)),
            "etcd did not start"
        );
        member
    }

    /// An `n`-member cluster, every member healthy.
    pub fn cluster(n: usize) -> Vec<Etcd> {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let tag = free_port();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{tag}x{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| Etcd {
                child: None,
                name: format!("m{tag}x{i}"),
                client_port: *client,
                peer_port: *peer,
                data_dir: temp_dir("etcd"),
                initial_cluster: initial_cluster.clone(),
                host: "127.0.0.1".to_owned(),
                netns: None,
            })
            .collect();
        Etcd::start_all(&mut members);
        members
    }

    /// One member on each of `hosts` of `net`, on etcd's standard ports and with etcd's
    /// default heartbeat and election timeout (100 ms, 1 s), every member healthy.
    pub fn cluster_on(net: &Net, hosts: &[usize]) -> Vec<Etcd> {
        let tag = free_port();
        let name = |i: usize| format!("m{tag}x{i}");
        let initial_cluster = hosts
            .iter()
            .map(|&h| format!("{}=http://{}:2380", name(h), net.host(h).addr))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Etcd> = hosts
            .iter()
            .map(|&h| Etcd {
                child: None,
                name: name(h),
                client_port: 2379,
                peer_port: 2380,
                data_dir: temp_dir("etcd"),
                initial_cluster: initial_cluster.clone(),
                host: net.host(h).addr.to_string(),
                netns: Some(net.host(h).netns.clone()),
            })
            .collect();
        Etcd::start_all(&mut members);
        members
    }

    fn start_all(members: &mut [Etcd]) {
        for member in members.iter_mut() {
            member.spawn();
        }
        for member in members.iter() {
            assert!(
                member.wait_healthy(Duration::from_secs(20)),
                "etcd member did not start"
            );
        }
    }

    fn spawn(&mut self) {
        let client = format!("http://{}:{}", self.host, self.client_port);
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let log = std::fs::File::create(self.data_dir.join("etcd.log")).unwrap();
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, "etcd"]);
                command
            }
            None => {
                let mut command = Command::new("etcd");
                command.args(["--heartbeat-interval", "50", "--election-timeout", "500"]);
                command
            }
        };
        let child = command
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.data_dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "comet-test",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd must be installed (Debian package etcd-server)");
        self.child = Some(child);
    }

    /// `host:port`, as `etcd_addr` takes it.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.client_port)
    }

    /// Whether this member is the cluster's leader now (false when it does not answer).
    pub fn is_leader(&self) -> bool {
        let endpoint = self.endpoint();
        block_on(async {
            let Some(mut client) = connect(&[endpoint]).await else {
                return false;
            };
            let Ok(status) = client.status().await else {
                return false;
            };
            status
                .header()
                .is_some_and(|header| header.member_id() == status.leader())
        })
    }

    fn wait_healthy(&self, limit: Duration) -> bool {
        let url = format!("http://{}/health", self.endpoint());
        wait_until(limit, || {
            ureq::get(&url)
                .timeout(Duration::from_millis(500))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .is_some_and(|body| body.contains("true"))
        })
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same data directory and waits until healthy.
    pub fn restart(&mut self) {
        self.spawn();
        assert!(
            self.wait_healthy(Duration::from_secs(20)),
            "etcd did not come back"
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A key as the tests see it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub lease: i64,
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

async fn connect(endpoints: &[String]) -> Option<Client> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2));
    Client::connect(endpoints, Some(options)).await.ok()
}

/// The keys under `prefix`; empty when etcd cannot be reached.
pub fn keys(endpoints: &[String], prefix: &str) -> Vec<Entry> {
    block_on(async {
        let Some(mut client) = connect(endpoints).await else {
            return Vec::new();
        };
        let Ok(reply) = client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
        else {
            return Vec::new();
        };
        reply
            .kvs()
            .iter()
            .map(|kv| Entry {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: String::from_utf8_lossy(kv.value()).into_owned(),
                lease: kv.lease(),
            })
            .collect()
    })
}

/// The one key named `key`, if present.
pub fn key(endpoints: &[String], key: &str) -> Option<Entry> {
    keys(endpoints, key).into_iter().find(|e| e.key == key)
}

/// (remaining TTL, granted TTL) of a lease, in seconds.
pub fn lease_ttl(endpoints: &[String], lease: i64) -> (i64, i64) {
    block_on(async {
        let mut client = connect(endpoints).await.unwrap();
        let reply = client.lease_time_to_live(lease, None).await.unwrap();
        (reply.ttl(), reply.granted_ttl())
    })
}

/// Holds `key` on a lease kept alive by a background thread until dropped: another
/// process claiming a node's identity.
pub struct HeldKey {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeldKey {
    pub fn hold(endpoints: &[String], key: &str) -> HeldKey {
        let endpoints = endpoints.to_vec();
        let key = key.to_owned();
        let (stop, stopped) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            block_on(async {
                let mut client = connect(&endpoints).await.unwrap();
                let lease = client.lease_grant(3, None).await.unwrap().id();
                client
                    .put(
                        key,
                        "{\"held\":\"by a test\"}",
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await
                    .unwrap();
                let (mut keeper, mut replies) = client.lease_keep_alive(lease).await.unwrap();
                ready_tx.send(()).unwrap();
                while stopped.try_recv().is_err() {
                    keeper.keep_alive().await.unwrap();
                    let _ = replies.message().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let _ = client.lease_revoke(lease).await;
            })
        });
        ready.recv().unwrap();
        HeldKey {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HeldKey {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
