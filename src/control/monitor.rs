//! The monitor (`comet -m`): tells the message server which Comet nodes exist.
//!
//! Lists `/<comet_service_name>/` in etcd, calls `addCometServer` for every node, then
//! watches from the next revision: PUT -> `addCometServer(key, value)`, DELETE ->
//! `removeCometServer(key, revision)`. What it has announced is recorded in etcd under
//! `/<comet_service_name>.monitor/announced/`, so that after a restart, an etcd outage or
//! a compaction it re-lists and reconciles: a node that left while nobody was watching
//! still gets its `removeCometServer`. It opens no listener and holds no clients.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use serde_json::{Value, json};

use crate::callback::{CallbackClient, CallbackError, CallbackStats};
use crate::config::Config;
use crate::control::etcd::Endpoints;

/// Longest pause between attempts to reach etcd.
const MAX_RETRY: Duration = Duration::from_secs(1);
/// Bound on one etcd request.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a watch session ended (the monitor then re-lists).
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("watch cancelled by etcd (compacted to revision {0})")]
    WatchCancelled(i64),
    #[error("watch stream ended")]
    WatchEnded,
}

/// Runs the monitor until SIGTERM/SIGINT.
pub fn run(config: Config) -> anyhow::Result<()> {
    if config.etcd_endpoints.is_empty() {
        anyhow::bail!("config key `etcd_addr`: the monitor needs etcd");
    }
    if config.rpc_api_url.is_empty() {
        anyhow::bail!("config key `rpc_api_url`: the monitor needs a message server to notify");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the monitor runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let monitor = Monitor::new(&config);
        tokio::select! {
            _ = monitor.run() => {}
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("monitor stopped");
        Ok(())
    })
}

/// A change to the records of what was announced.
#[derive(Clone)]
enum Record {
    Put(String, String),
    Delete(String),
}

struct Monitor {
    endpoints: Endpoints,
    /// The first listing announces every node (as the original did at start); later
    /// ones, after a lost watch, announce only what changed.
    announced_all: Cell<bool>,
    /// Mirror of the records: node key -> the value last announced for it. A PUT that
    /// changes nothing (a node renewing its lease) is not forwarded.
    announced: RefCell<HashMap<String, String>>,
    /// Announcements made but not yet written to the records.
    unrecorded: RefCell<Vec<Record>>,
    prefix: String,
    records: String,
    callbacks: CallbackClient,
    retries: u32,
}

impl Monitor {
    fn new(config: &Config) -> Monitor {
        let name = &config.comet_service_name;
        Monitor {
            endpoints: Endpoints::new(config.etcd_endpoints.clone()),
            announced_all: Cell::new(false),
            announced: RefCell::new(HashMap::new()),
            unrecorded: RefCell::new(Vec::new()),
            prefix: format!("/{name}/"),
            records: format!("/{name}.monitor/announced"),
            callbacks: CallbackClient::new(
                &config.rpc_api_url,
                &config.rpc_user_agent,
                "",
                config.callback_timeout,
                std::sync::Arc::new(CallbackStats::default()),
            ),
            retries: config.callback_retries,
        }
    }

    async fn run(&self) {
        let mut retry = Duration::from_millis(100);
        loop {
            match self.session().await {
                Ok(never) => match never {},
                Err(end) => tracing::warn!(error = %end, "monitor watch interrupted; re-listing"),
            }
            self.endpoints.rotate();
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    async fn session(&self) -> Result<std::convert::Infallible, SessionEnd> {
        let mut client = timed(self.endpoints.connect(ETCD_TIMEOUT)).await?;
        self.write_records(&mut client).await?;
        let revision = self.reconcile(&mut client).await?;
        let watch = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = timed(client.watch(self.prefix.as_str(), Some(watch))).await?;
        tracing::info!(prefix = %self.prefix, from_revision = revision + 1, "watching nodes");
        while let Some(reply) = stream.message().await? {
            if reply.canceled() || reply.compact_revision() > 0 {
                return Err(SessionEnd::WatchCancelled(reply.compact_revision()));
            }
            for event in reply.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match event.event_type() {
                    EventType::Put => {
                        let value = String::from_utf8_lossy(kv.value()).into_owned();
                        self.add(&mut client, &key, &value, false).await?;
                    }
                    EventType::Delete => self.remove(&mut client, &key, kv.mod_revision()).await?,
                }
            }
        }
        Err(SessionEnd::WatchEnded)
    }

    /// Announces every node present and removes every announced node that is gone.
    /// Returns the revision the listing was taken at.
    async fn reconcile(&self, client: &mut Client) -> Result<i64, SessionEnd> {
        let nodes =
            timed(client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = nodes.header().map_or(0, |h| h.revision());
        let present: BTreeMap<String, String> = nodes
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect();
        let records_prefix = format!("{}/", self.records);
        let records = timed(client.get(
            records_prefix.as_str(),
            Some(GetOptions::new().with_prefix()),
        ))
        .await?;
        let recorded: HashMap<String, String> = records
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let node = key.strip_prefix(&self.records)?.to_owned();
                Some((node, String::from_utf8_lossy(kv.value()).into_owned()))
            })
            .collect();
        let gone: Vec<String> = recorded
            .keys()
            .filter(|node| !present.contains_key(*node))
            .cloned()
            .collect();
        *self.announced.borrow_mut() = recorded;
        tracing::info!(
            present = present.len(),
            gone = gone.len(),
            revision,
            "reconciling nodes"
        );
        let announce_all = !self.announced_all.get();
        for (key, value) in &present {
            self.add(client, key, value, announce_all).await?;
        }
        self.announced_all.set(true);
        for key in &gone {
            self.remove(client, key, revision).await?;
        }
        Ok(revision)
    }

    /// Announces a node unless the same value was announced already (`force`: anyway).
    async fn add(
        &self,
        client: &mut Client,
        key: &str,
        value: &str,
        force: bool,
    ) -> Result<(), SessionEnd> {
        let unchanged = self.announced.borrow().get(key).map(String::as_str) == Some(value);
        if unchanged && !force {
            return Ok(());
        }
        let args = vec![json!(key), json!(value)];
        if self.notify("addCometServer", args, key).await.is_ok() {
            self.announced
                .borrow_mut()
                .insert(key.to_owned(), value.to_owned());
            self.unrecorded
                .borrow_mut()
                .push(Record::Put(key.to_owned(), value.to_owned()));
        }
        self.write_records(client).await
    }

    async fn remove(
        &self,
        client: &mut Client,
        key: &str,
        revision: i64,
    ) -> Result<(), SessionEnd> {
        let args = vec![json!(key), json!(revision)];
        if self.notify("removeCometServer", args, key).await.is_ok() {
            self.announced.borrow_mut().remove(key);
            self.unrecorded
                .borrow_mut()
                .push(Record::Delete(key.to_owned()));
        }
        self.write_records(client).await
    }

    /// Writes what was announced to etcd, oldest first. A write that fails stays queued
    /// (and the session ends); the next session writes it before it lists anything, so
    /// the record never disagrees with what the message server was told.
    async fn write_records(&self, client: &mut Client) -> Result<(), SessionEnd> {
        loop {
            let Some(record) = self.unrecorded.borrow().first().cloned() else {
                return Ok(());
            };
            match &record {
                Record::Put(key, value) => {
                    timed(client.put(self.record_key(key), value.as_str(), None)).await?;
                }
                Record::Delete(key) => {
                    timed(client.delete(self.record_key(key), None)).await?;
                }
            }
            self.unrecorded.borrow_mut().remove(0);
        }
    }

    fn record_key(&self, node_key: &str) -> String {
        format!("{}{node_key}", self.records)
    }

    /// Calls the message server off the runtime thread (ureq blocks), with retries. A
    /// call given up is not recorded, so the next reconcile tries it again.
    async fn notify(
        &self,
        method: &'static str,
        args: Vec<Value>,
        key: &str,
    ) -> Result<(), CallbackError> {
        let client = self.callbacks.clone();
        let retries = self.retries;
        let id = key.to_owned();
        let outcome = tokio::task::spawn_blocking(move || {
            client.call_with_retries(method, &args, retries, &id)
        })
        .await
        .unwrap_or_else(|panic| Err(CallbackError::Unreachable(panic.to_string())));
        if outcome.is_ok() {
            tracing::info!(key, method, "message server notified");
        }
        outcome
    }
}

async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, SessionEnd> {
    match tokio::time::timeout(ETCD_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SessionEnd::Timeout(ETCD_TIMEOUT)),
    }
}
