//! The monitor (`comet -m`): tells the message server which Comet nodes exist.
//!
//! Lists `/<comet_service_name>/` in etcd, calls `addCometServer` for every node, then
//! watches from the next revision: PUT -> `addCometServer(key, value)`, DELETE ->
//! `removeCometServer(key, revision)`. What it has announced is recorded in etcd under
//! `/_comet_monitor/<comet_service_name>/announced/`, so that after a restart, an etcd outage or
//! a compaction it re-lists and reconciles: a node that left while nobody was watching
//! still gets its `removeCometServer`. A watch broken while the monitor runs (a member
//! failed, a partition) resumes from the revision after the last event seen, so nothing
//! is missed or announced twice; only a compaction or a given-up announcement makes it
//! re-list ([`after_interruption`]). An announcement given up on an unreachable or
//! failing message server (not a refusal) ends the session at once, so it is retried by
//! that re-list (at most every [`MAX_GIVEN_UP_RETRY`]) even while the
//! watch is healthy: a removal is never retried otherwise, for no later event comes for
//! a deleted key. It opens no listener and holds no clients.

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
/// Longest pause before a re-list retries an announcement that could not reach the
/// message server (it may stay down for long: each retry logs).
const MAX_GIVEN_UP_RETRY: Duration = Duration::from_secs(10);
/// Bound on one etcd request.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the member being watched is asked whether it still serves
/// ([`Monitor::check_member`]).
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long that answer may take: generous, since a false alarm costs a resumed watch.
const HEALTH_CHECK_DEADLINE: Duration = Duration::from_secs(2);

/// How the next watch session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// List the nodes and reconcile with the records, then watch from the listing.
    Relist,
    /// Watch again from this revision: nothing after it was seen.
    Resume(i64),
}

/// How to go on after a session ended with `end`, having seen every event up to
/// `last_seen` (none: the listing itself was not finished). Resuming is exact and costs
/// no listing; a re-list is needed only when etcd dropped the history (a compaction
/// cancels the watch) or an announcement was given up (the re-list retries it). A watch
/// cancelled for another reason ("no leader" during an election) resumes: a re-list
/// reconciles against the records that every monitor shares, so it would skip a removal
/// another monitor already announced. (Two monitors with one cut off once delivered a
/// removal once instead of twice, in one run of four under load; this is the one path
/// found that can do that, not a confirmed cause.)
fn after_interruption(last_seen: Option<i64>, end: &SessionEnd) -> Start {
    match (last_seen, end) {
        (_, SessionEnd::WatchCancelled(compacted)) if *compacted > 0 => Start::Relist,
        (_, SessionEnd::GivenUp(_)) => Start::Relist,
        (None, _) => Start::Relist,
        (Some(revision), _) => Start::Resume(revision + 1),
    }
}

/// The pause before the next session: etcd's back-off (`retry`), or after a given-up
/// announcement `given_up`, which doubles while re-lists keep failing, up to
/// [`MAX_GIVEN_UP_RETRY`].
fn next_pause(end: &SessionEnd, retry: Duration, given_up: Duration) -> Duration {
    match end {
        SessionEnd::GivenUp(_) => given_up,
        _ => retry,
    }
}

/// Why a watch session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("watch cancelled by etcd (compacted to revision {0}; 0: not compacted)")]
    WatchCancelled(i64),
    #[error("watch stream ended")]
    WatchEnded,
    #[error("the message server could not be reached for {0}; re-listing to try it again")]
    GivenUp(&'static str),
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
        // Held since `app::hold_stop_signals`: SIGTERM and SIGINT reach the handlers now,
        // SIGHUP and SIGUSR2 their default action, as before.
        crate::sys::release_stop_signals();
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
    /// The revision of the last event handled (or of the listing): a broken watch
    /// resumes after it.
    last_seen: Cell<Option<i64>>,
    /// The session got as far as watching (the back-off starts over).
    watching: Cell<bool>,
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
            // Outside `/<name>`: the original's second-generation monitor watched the
            // prefix `/comet` without its slash, and one still running beside this one
            // during a migration would take `/comet.monitor/...` for nodes.
            records: format!("/_comet_monitor/{name}/announced"),
            callbacks: CallbackClient::new(
                &config.rpc_api_url,
                &config.rpc_user_agent,
                "",
                config.callback_timeout,
                std::sync::Arc::new(CallbackStats::default()),
            ),
            retries: config.callback_retries,
            last_seen: Cell::new(None),
            watching: Cell::new(false),
        }
    }

    async fn run(&self) {
        let mut retry = Duration::from_millis(100);
        let mut given_up = Duration::from_secs(1);
        let mut start = Start::Relist;
        loop {
            self.watching.set(false);
            let end = match self.session(start).await {
                Ok(never) => match never {},
                Err(end) => end,
            };
            start = after_interruption(self.last_seen.get(), &end);
            match start {
                Start::Relist => {
                    self.last_seen.set(None);
                    tracing::warn!(error = %end, "monitor watch interrupted; re-listing");
                }
                Start::Resume(from) => {
                    tracing::warn!(error = %end, from_revision = from, "monitor watch interrupted; resuming")
                }
            }
            // A session that got as far as watching starts both back-offs over.
            if self.watching.get() {
                retry = Duration::from_millis(100);
                given_up = Duration::from_secs(1);
            }
            self.endpoints.rotate();
            tokio::time::sleep(next_pause(&end, retry, given_up)).await;
            match end {
                SessionEnd::GivenUp(_) => given_up = (given_up * 2).min(MAX_GIVEN_UP_RETRY),
                _ => retry = (retry * 2).min(MAX_RETRY),
            }
        }
    }

    async fn session(&self, start: Start) -> Result<std::convert::Infallible, SessionEnd> {
        let mut client = timed(self.endpoints.connect(ETCD_TIMEOUT)).await?;
        self.write_records(&mut client).await?;
        let from = match start {
            Start::Relist => {
                let revision = self.reconcile(&mut client).await?;
                self.last_seen.set(Some(revision));
                revision + 1
            }
            Start::Resume(from) => from,
        };
        let watch = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = timed(client.watch(self.prefix.as_str(), Some(watch))).await?;
        self.watching.set(true);
        tracing::info!(prefix = %self.prefix, from_revision = from, "watching nodes");
        let mut health = tokio::time::interval(HEALTH_CHECK_EVERY);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        health.tick().await;
        loop {
            let reply = tokio::select! {
                reply = stream.message() => reply?,
                _ = health.tick() => {
                    self.check_member(&mut client).await?;
                    continue;
                }
            };
            let Some(reply) = reply else {
                return Err(SessionEnd::WatchEnded);
            };
            if reply.canceled() || reply.compact_revision() > 0 {
                return Err(SessionEnd::WatchCancelled(reply.compact_revision()));
            }
            for event in reply.events() {
                let Some(kv) = event.kv() else { continue };
                // Seen once handled here: an announcement made stays made even if
                // recording it fails, and a replay would announce a removal twice.
                self.last_seen.set(Some(kv.mod_revision()));
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
    }

    /// Ends the session unless the member watched still serves: a linearizable count of
    /// the nodes goes through the leader. A member cut off from the monitor or from its
    /// quorum sends no events and no error (its TCP connection just hangs, and HTTP/2
    /// keepalive, at 10 s for etcd's sake, would notice only after 13 s): without this
    /// check a removal came up to 13 s late; with it, within
    /// `HEALTH_CHECK_EVERY + HEALTH_CHECK_DEADLINE` plus a resume.
    async fn check_member(&self, client: &mut Client) -> Result<(), SessionEnd> {
        let count = GetOptions::new().with_prefix().with_count_only();
        match tokio::time::timeout(
            HEALTH_CHECK_DEADLINE,
            client.get(self.prefix.as_str(), Some(count)),
        )
        .await
        {
            Ok(reply) => reply.map(drop).map_err(SessionEnd::from),
            Err(_) => Err(SessionEnd::Timeout(HEALTH_CHECK_DEADLINE)),
        }
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
        // One announcement the message server does not take is no reason to skip the
        // others: the session ends once all were tried.
        let mut given_up = None;
        for (key, value) in &present {
            given_up = given_up.or(taken(self.add(client, key, value, announce_all).await)?);
        }
        self.announced_all.set(true);
        for key in &gone {
            given_up = given_up.or(taken(self.remove(client, key, revision).await)?);
        }
        match given_up {
            Some(method) => Err(SessionEnd::GivenUp(method)),
            None => Ok(revision),
        }
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
        let taken = self.notify("addCometServer", args, key).await;
        if taken.is_ok() {
            self.announced
                .borrow_mut()
                .insert(key.to_owned(), value.to_owned());
            self.unrecorded
                .borrow_mut()
                .push(Record::Put(key.to_owned(), value.to_owned()));
        }
        self.write_records(client).await?;
        given_up(taken, "addCometServer")
    }

    async fn remove(
        &self,
        client: &mut Client,
        key: &str,
        revision: i64,
    ) -> Result<(), SessionEnd> {
        let args = vec![json!(key), json!(revision)];
        let taken = self.notify("removeCometServer", args, key).await;
        if taken.is_ok() {
            self.announced.borrow_mut().remove(key);
            self.unrecorded
                .borrow_mut()
                .push(Record::Delete(key.to_owned()));
        }
        self.write_records(client).await?;
        given_up(taken, "removeCometServer")
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
    /// call given up is not recorded, so the re-list it causes tries it again.
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

/// A call the message server could not be reached for (after its retries) ends the
/// session, to be retried by the re-list; a refusal (a non-zero `code`) is its verdict
/// and is not retried, as the original did not.
fn given_up(taken: Result<(), CallbackError>, method: &'static str) -> Result<(), SessionEnd> {
    match taken {
        Err(err) if err.is_transient() => Err(SessionEnd::GivenUp(method)),
        _ => Ok(()),
    }
}

/// Splits an announcement's outcome: `Ok(Some(method))` when the message server did not
/// take it, `Err` when etcd failed.
fn taken(outcome: Result<(), SessionEnd>) -> Result<Option<&'static str>, SessionEnd> {
    match outcome {
        Ok(()) => Ok(None),
        Err(SessionEnd::GivenUp(method)) => Ok(Some(method)),
        Err(end) => Err(end),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_watch_resumes_after_the_last_revision_seen() {
        let broke = SessionEnd::WatchEnded;
        assert_eq!(after_interruption(Some(41), &broke), Start::Resume(42));
        let timeout = SessionEnd::Timeout(ETCD_TIMEOUT);
        assert_eq!(after_interruption(Some(7), &timeout), Start::Resume(8));
    }

    #[test]
    fn a_compaction_or_an_unfinished_listing_re_lists() {
        let compacted = SessionEnd::WatchCancelled(100);
        assert_eq!(after_interruption(Some(41), &compacted), Start::Relist);
        assert_eq!(
            after_interruption(None, &SessionEnd::WatchEnded),
            Start::Relist
        );
    }

    #[test]
    fn a_watch_cancelled_without_compaction_resumes() {
        let no_leader = SessionEnd::WatchCancelled(0);
        assert_eq!(after_interruption(Some(41), &no_leader), Start::Resume(42));
    }

    #[test]
    fn a_given_up_announcement_re_lists_to_retry_it() {
        let given_up = SessionEnd::GivenUp("removeCometServer");
        assert_eq!(after_interruption(Some(41), &given_up), Start::Relist);
    }

    #[test]
    fn a_given_up_announcement_waits_its_own_back_off() {
        let (retry, given_up) = (Duration::from_millis(100), Duration::from_secs(4));
        let end = SessionEnd::GivenUp("addCometServer");
        assert_eq!(next_pause(&end, retry, given_up), given_up);
        assert_eq!(next_pause(&SessionEnd::WatchEnded, retry, given_up), retry);
    }
}
