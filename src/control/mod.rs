//! The control thread: one tokio current-thread runtime that owns the conn_id directory,
//! serves the push RPC, fans pushes out to the shards, keeps the etcd registration, runs
//! the load self-check and runs shutdown.
//!
//! It may wait on the network (RPC clients, etcd) but never on a shard: commands go out
//! through non-blocking channel sends and replies come back as futures. Shards reach it
//! only through `link` ([`crate::link::ControlLink`]), and it reaches them only through
//! their [`crate::link::ShardHandle`]s: it never names the `shard` module.

pub(crate) mod admin;
pub(crate) mod directory;
pub(crate) mod etcd;
pub(crate) mod load;
pub(crate) mod metrics;
pub mod monitor;
pub(crate) mod process;
pub(crate) mod watchdog;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::{oneshot, watch};

use crate::callback::CallbackStats;
use crate::codec::Message;
use crate::config::Config;
use crate::link::{
    BroadcastOutcome, DirectoryRequest, DirectoryRequests, PushOutcome, ShardCommand, ShardHandle,
    ShardStats,
};
use crate::presence::Presence;
use crate::rpc::forward::Forwarder;
use crate::session::CloseReason;
use directory::{Claim, Directory, Split};
use etcd::{Published, Registrar};
use load::{LoadCheck, LoadSample, LoadState};

/// Longest wait for a shard's reply. Shards answer in microseconds to milliseconds (a
/// broadcast to 100,000 clients takes well under a second); a shard that has not answered
/// in this long is stuck, and the call reports its ids failed rather than hang.
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/readyz` waits for every shard to answer a ping.
const SHARD_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Awaits a shard's reply within [`SHARD_REPLY_TIMEOUT`]; `None` if it ended or is stuck.
async fn shard_reply<T>(shard: usize, answer: oneshot::Receiver<T>) -> Option<T> {
    match tokio::time::timeout(SHARD_REPLY_TIMEOUT, answer).await {
        Ok(answer) => answer.ok(),
        Err(_) => {
            tracing::error!(shard, timeout = ?SHARD_REPLY_TIMEOUT, "shard did not answer");
            None
        }
    }
}

/// Push RPC counters.
#[derive(Debug, Default)]
struct PushCounters {
    calls: Cell<u64>,
    recipients: Cell<u64>,
    delivered: Cell<u64>,
    failed: Cell<u64>,
    broadcasts: Cell<u64>,
    group_pushes: Cell<u64>,
    kicks: Cell<u64>,
    not_on_node: Cell<u64>,
    /// From a push call read to its answer (`SendToConnections`, `Broadcast`,
    /// `SendToGroup`), as the node sees it.
    latency: crate::histogram::Histogram,
    /// Recipients sent on to the other side of a hand-over: to the successor while this
    /// process drains, or to the draining predecessor.
    forwarded: Cell<u64>,
}

/// A change of a group's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Membership {
    Join,
    Leave,
}

/// Whether a push may be sent on to the other process of a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// A message server's call: ids not held here are tried on the other process.
    MayForward,
    /// A call the other process forwarded (it arrived on the peer listener): answered
    /// from here only, so that no push goes back and forth.
    HereOnly,
}

/// One push counter, defined once: its key in `/status`, its metric and where it is.
struct PushCounter {
    status: &'static str,
    metric: &'static str,
    help: &'static str,
    of: fn(&PushCounters) -> &Cell<u64>,
}

/// Every push counter, in the order `/status` and `/metrics` show them.
const PUSH_COUNTERS: [PushCounter; 9] = [
    PushCounter {
        status: "calls",
        metric: "comet_push_calls_total",
        help: "SendToConnections calls.",
        of: |c| &c.calls,
    },
    PushCounter {
        status: "recipients",
        metric: "comet_push_recipients_total",
        help: "Recipients named in SendToConnections calls.",
        of: |c| &c.recipients,
    },
    PushCounter {
        status: "delivered",
        metric: "comet_deliveries_total",
        help: "Messages handed to clients (pushes, broadcasts, group pushes).",
        of: |c| &c.delivered,
    },
    PushCounter {
        status: "failed",
        metric: "comet_push_failed_total",
        help: "Push recipients reported failed to the caller.",
        of: |c| &c.failed,
    },
    PushCounter {
        status: "not_on_node",
        metric: "comet_push_not_on_node_total",
        help: "Push recipients not connected to this node.",
        of: |c| &c.not_on_node,
    },
    PushCounter {
        status: "forwarded",
        metric: "comet_push_forwarded_total",
        help: "Push recipients not reached here that were sent on to the other process of a restart (the successor, or the draining predecessor).",
        of: |c| &c.forwarded,
    },
    PushCounter {
        status: "broadcasts",
        metric: "comet_broadcasts_total",
        help: "Broadcast calls.",
        of: |c| &c.broadcasts,
    },
    PushCounter {
        status: "group_pushes",
        metric: "comet_group_pushes_total",
        help: "SendToGroup calls.",
        of: |c| &c.group_pushes,
    },
    PushCounter {
        status: "kicked",
        metric: "comet_kicks_total",
        help: "Clients named in KickConnections calls.",
        of: |c| &c.kicks,
    },
];

fn bump(counter: &Cell<u64>, by: usize) {
    counter.set(counter.get() + by as u64);
}

/// Running totals behind a summary line.
#[derive(Default)]
struct Summary {
    upgraded: u64,
    refusals: std::collections::BTreeMap<&'static str, u64>,
    disconnects: std::collections::BTreeMap<&'static str, u64>,
    push_calls: u64,
    delivered: u64,
    failed: u64,
}

impl Summary {
    fn of(stats: &[ShardStats], counters: &PushCounters) -> Summary {
        let mut refusals = std::collections::BTreeMap::new();
        let mut disconnects = std::collections::BTreeMap::new();
        for shard in stats {
            for (reason, n) in &shard.handshake_refusals {
                *refusals.entry(*reason).or_default() += n;
            }
            for (reason, n) in &shard.disconnects {
                *disconnects.entry(*reason).or_default() += n;
            }
        }
        Summary {
            upgraded: stats.iter().map(|s| s.upgraded).sum(),
            refusals,
            disconnects,
            push_calls: counters.calls.get(),
            delivered: counters.delivered.get(),
            failed: counters.failed.get(),
        }
    }

    /// Refusals by reason since `earlier`, only the reasons that moved.
    fn refusals_since(&self, earlier: &Summary) -> std::collections::BTreeMap<&'static str, u64> {
        moved_since(&self.refusals, &earlier.refusals)
    }

    /// Disconnects by reason since `earlier`, only the reasons that moved.
    fn disconnects_since(
        &self,
        earlier: &Summary,
    ) -> std::collections::BTreeMap<&'static str, u64> {
        moved_since(&self.disconnects, &earlier.disconnects)
    }
}

/// The growth of each counter from `earlier` to `now`, only those that grew.
fn moved_since(
    now: &std::collections::BTreeMap<&'static str, u64>,
    earlier: &std::collections::BTreeMap<&'static str, u64>,
) -> std::collections::BTreeMap<&'static str, u64> {
    now.iter()
        .map(|(reason, n)| (*reason, n - earlier.get(reason).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The ids a shard-routed command did not reach.
struct HolderAnswers {
    /// Not in the directory: not on this node.
    not_here: Vec<String>,
    /// Named by the shard that holds them (not found there, or not delivered).
    answered: Vec<String>,
}

impl HolderAnswers {
    fn all(mut self) -> Vec<String> {
        self.not_here.extend(self.answered);
        self.not_here
    }
}

/// What the node needs besides its shards.
pub(crate) struct NodeParts {
    /// The node configuration.
    pub(crate) config: Arc<Config>,
    /// One handle per shard.
    pub(crate) shards: Vec<ShardHandle>,
    /// Shared with the shards: new handshakes get 503 while set.
    pub(crate) refuse_new_clients: Arc<AtomicBool>,
    /// Shared with every callback client.
    pub(crate) callback_stats: Arc<CallbackStats>,
    /// A predecessor's etcd lease holding this node's key (zero-downtime restart).
    pub(crate) inherited_lease: Option<i64>,
    /// The presence lanes, for their backlog.
    pub(crate) presence: Presence,
}

/// The control thread's view of the node.
pub(crate) struct Node {
    /// The node configuration.
    pub(crate) config: Arc<Config>,
    directory: RefCell<Directory<oneshot::Sender<bool>>>,
    shards: Vec<ShardHandle>,
    registrar: Option<Registrar>,
    load: RefCell<LoadCheck>,
    last_sample: Cell<LoadSample>,
    refuse_new_clients: Arc<AtomicBool>,
    callback_stats: Arc<CallbackStats>,
    presence: Presence,
    counters: PushCounters,
    draining: Cell<bool>,
    /// Whether a successor serves in this process's place (`/readyz` answers for it).
    handed_over: Cell<bool>,
    /// After a hand-over: the successor that takes the pushes for ids not held here.
    successor: RefCell<Option<Rc<Forwarder>>>,
    /// While the process that handed over to this one drains: it takes the pushes for ids
    /// not held here (its clients are still moving). Dropped once it refuses.
    predecessor: RefCell<Option<Rc<Forwarder>>>,
    /// Set once this draining process has no clients left: every RPC connection closes
    /// as soon as it is idle, so message servers reconnect to the successor.
    rpc_moving: watch::Sender<bool>,
    /// One receiver per admin request being answered (its count is how many).
    admin_requests: watch::Sender<()>,
    started: Instant,
    started_unix: u64,
}

impl Node {
    /// A node fanning out to `parts.shards`.
    pub(crate) fn new(parts: NodeParts) -> Rc<Node> {
        let NodeParts {
            config,
            shards,
            refuse_new_clients,
            callback_stats,
            inherited_lease,
            presence,
        } = parts;
        let directory = Directory::new(shards.len(), config.duplicate_conn_id);
        Rc::new(Node {
            directory: RefCell::new(directory),
            registrar: Registrar::new(&config, inherited_lease),
            load: RefCell::new(LoadCheck::new(config.overload)),
            last_sample: Cell::new(LoadSample::default()),
            refuse_new_clients,
            callback_stats,
            presence,
            counters: PushCounters::default(),
            draining: Cell::new(false),
            handed_over: Cell::new(false),
            successor: RefCell::new(None),
            predecessor: RefCell::new(None),
            rpc_moving: watch::Sender::new(false),
            admin_requests: watch::Sender::new(()),
            config,
            shards,
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// Keeps the node registered in etcd. Returns only if registration is impossible
    /// (another process holds this node's key); standalone nodes never return.
    pub(crate) async fn keep_registered(self: Rc<Self>) -> etcd::RegistrationError {
        match &self.registrar {
            Some(registrar) => registrar.run(&self).await,
            None => std::future::pending().await,
        }
    }

    /// The etcd lease holding the node's key, if registered.
    pub(crate) fn current_lease(&self) -> Option<i64> {
        self.registrar.as_ref().and_then(|r| r.status().lease)
    }

    /// Removes the node's etcd key now (first step of a graceful shutdown); from here on
    /// `/readyz` says "draining".
    pub(crate) async fn deregister(&self) {
        self.draining.set(true);
        if let Some(registrar) = &self.registrar {
            registrar.deregister().await;
        }
    }

    /// Stops the registration without touching the key: a successor owns it now.
    pub(crate) fn stop_registering(&self) {
        if let Some(registrar) = &self.registrar {
            registrar.stop();
        }
    }

    /// The value of the node's etcd key, and the load figures it carries.
    pub(crate) fn registration_value(&self) -> (String, Published) {
        let connections = self.directory.borrow().len() as u64;
        let overloaded = self.load.borrow().state().overloaded;
        let value = json!({
            "Protocol": self.config.socket_protocol.scheme(),
            "RpcAddr": self.config.rpc_addr,
            "CometAddr": self.config.comet_addr(),
            "connections": connections,
            "shards": self.shards.len(),
            "overloaded": overloaded,
            "version": env!("CARGO_PKG_VERSION"),
            "start_time": self.started_unix,
        });
        (
            value.to_string(),
            Published {
                connections,
                overloaded,
            },
        )
    }

    /// Samples the load every `interval` and applies the thresholds.
    pub(crate) async fn check_load(self: Rc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            let queued = self
                .shard_stats()
                .await
                .iter()
                .map(|s| s.queued_messages as u64)
                .sum();
            let sample = LoadSample {
                connections: self.directory.borrow().len() as u64,
                rss: crate::sys::rss_bytes().unwrap_or(0),
                queued,
            };
            self.last_sample.set(sample);
            let before = self.load.borrow().state();
            let after = self.load.borrow_mut().update(sample);
            if before != after {
                tracing::warn!(
                    ?sample,
                    overloaded = after.overloaded,
                    refusing_new_clients = after.refusing,
                    "load state changed"
                );
                self.refuse_new_clients
                    .store(after.refuse_by_sample, Ordering::Relaxed);
            }
        }
    }

    /// Logs one INFO line per `every`: clients now, and what happened since the last
    /// line (connects, refusals by reason, pushes). Per-client events are debug lines: a
    /// reconnect storm of 100k clients would otherwise write 200k INFO lines.
    pub(crate) async fn log_summaries(self: Rc<Self>, every: Duration) {
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        let mut last = Summary::default();
        loop {
            ticker.tick().await;
            let stats = self.shard_stats().await;
            let now = Summary::of(&stats, &self.counters);
            tracing::info!(
                connections = stats.iter().map(|s| s.connections).sum::<usize>(),
                connects = now.upgraded - last.upgraded,
                disconnects = ?now.disconnects_since(&last),
                refusals = ?now.refusals_since(&last),
                push_calls = now.push_calls - last.push_calls,
                delivered = now.delivered - last.delivered,
                failed = now.failed - last.failed,
                interval = ?every,
                "summary"
            );
            last = now;
        }
    }

    /// The load state.
    pub(crate) fn load_state(&self) -> LoadState {
        self.load.borrow().state()
    }

    /// Applies shards' claims and releases until every shard has hung up.
    pub(crate) async fn serve_directory(self: Rc<Self>, mut requests: DirectoryRequests) {
        while let Some(request) = requests.recv().await {
            match request {
                DirectoryRequest::Claim {
                    conn_id,
                    shard,
                    reply,
                } => self.claim(conn_id, shard, reply),
                DirectoryRequest::Release {
                    conn_id,
                    shard,
                    parked,
                } => self.release(&conn_id, shard, parked),
                DirectoryRequest::Expired { conn_id, shard } => {
                    self.directory.borrow_mut().expired(&conn_id, shard)
                }
            }
        }
    }

    fn claim(&self, conn_id: String, shard: usize, reply: oneshot::Sender<bool>) {
        let decision = self.directory.borrow_mut().claim(&conn_id, shard, reply);
        match decision {
            Claim::Granted(reply) => {
                if reply.send(true).is_err() {
                    // The claimant gave up (timed out) before hearing back.
                    self.release(&conn_id, shard, false);
                }
            }
            Claim::Moved { waiter, from } => self.move_buffer(conn_id, from, shard, waiter),
            Claim::Refused(reply) => {
                let _ = reply.send(false);
            }
            Claim::KickHolder {
                shard: holder,
                superseded,
            } => {
                if let Some(earlier) = superseded {
                    let _ = earlier.send(false);
                }
                self.shards[holder].send(ShardCommand::Kick {
                    conn_ids: vec![conn_id],
                    reason: CloseReason::Replaced,
                    reply: None,
                });
            }
        }
    }

    /// Grants `conn_id` to a claimant on shard `to` once the recovery buffer parked on
    /// `from` is there: `to` first keeps what is pushed from now on, then `from` sends it
    /// the buffer and the grant, so the client's first frame comes after everything it
    /// missed, in order.
    fn move_buffer(&self, conn_id: String, from: usize, to: usize, grant: oneshot::Sender<bool>) {
        self.shards[to].send(ShardCommand::ExpectParcel {
            conn_id: conn_id.clone(),
        });
        self.shards[from].send(ShardCommand::HandOver {
            conn_id,
            to: self.shards[to].clone(),
            grant,
        });
    }

    fn release(&self, conn_id: &str, shard: usize, parked: bool) {
        let mut releasing = shard;
        // Whether `releasing` holds a parked recovery buffer for it.
        let mut parked = parked;
        loop {
            let next = self
                .directory
                .borrow_mut()
                .release(conn_id, releasing, parked);
            match next {
                Some((next_shard, waiter)) if parked && next_shard != releasing => {
                    return self.move_buffer(conn_id.to_owned(), releasing, next_shard, waiter);
                }
                Some((next_shard, waiter)) => match waiter.send(true) {
                    Ok(()) => return,
                    // That claimant gave up waiting: release on its behalf and go on.
                    Err(_) => {
                        parked = parked && next_shard == releasing;
                        releasing = next_shard;
                    }
                },
                None => return,
            }
        }
    }

    /// Delivers `msg` to each of `conn_ids` (duplicates count once); returns those not
    /// delivered (not on this node, closing, or whose queue was full) and those only kept
    /// in a recovery buffer for a client away. After a hand-over the ids not delivered here
    /// are tried on the successor, where the clients closed by this drain reconnect; only
    /// those it cannot reach either are returned.
    /// Before that, while the predecessor drains, they are tried there. A call that came
    /// from the other process (`Route::HereOnly`) is never sent on again.
    pub(crate) async fn push(&self, conn_ids: &[String], msg: &str, route: Route) -> PushOutcome {
        let mut outcome = self.fan_out(conn_ids, msg).await;
        if let Some(other) = self.forward_target(route) {
            let mut not_here = std::mem::take(&mut outcome.failed);
            if self.successor.borrow().is_some() {
                // A draining process's recovery buffers die with it, and a client it
                // parked has most likely moved on: the successor decides.
                not_here.append(&mut outcome.buffered);
            }
            if !not_here.is_empty() {
                bump(&self.counters.forwarded, not_here.len());
                let there = other.push(not_here, msg).await;
                outcome.failed = there.failed;
                outcome.buffered.extend(there.buffered);
                self.drop_gone(&other);
            }
        }
        let failed = &outcome.failed;
        bump(&self.counters.calls, 1);
        bump(&self.counters.recipients, conn_ids.len());
        bump(&self.counters.failed, failed.len());
        bump(
            &self.counters.delivered,
            conn_ids.len().saturating_sub(failed.len()),
        );
        outcome
    }

    /// Where the pushes not delivered here go next, if anywhere.
    fn forward_target(&self, route: Route) -> Option<Rc<Forwarder>> {
        if route == Route::HereOnly {
            return None;
        }
        let successor = self.successor.borrow().clone();
        successor.or_else(|| self.predecessor.borrow().clone())
    }

    /// This process was handed over to: until `target` refuses (the predecessor has no
    /// clients left and closed its peer listener), the pushes this process cannot deliver
    /// are tried there.
    pub(crate) fn forward_back_to(&self, target: crate::handover::ForwardTarget) {
        tracing::info!(predecessor_rpc = %target.addr, "pushes for clients not held here go to the draining predecessor");
        let forwarder = Rc::new(Forwarder::new(target));
        *self.predecessor.borrow_mut() = Some(Rc::clone(&forwarder));
        tokio::task::spawn_local(async move { forwarder.open().await });
    }

    async fn fan_out(&self, conn_ids: &[String], msg: &str) -> PushOutcome {
        let message = Message::new(msg.as_bytes());
        // One reply per shard carries both lists (a second oneshot per shard for the
        // buffered ids cost an allocation and a wake-up check per push).
        let (not_here, answers) = self
            .send_to_holders(conn_ids, |conn_ids, reply| ShardCommand::Push {
                message: Arc::clone(&message),
                conn_ids,
                reply,
            })
            .await;
        bump(&self.counters.not_on_node, not_here.len());
        let mut outcome = PushOutcome {
            failed: not_here,
            buffered: Vec::new(),
        };
        for (ids, answer) in answers {
            match answer {
                Some(answer) => {
                    outcome.failed.extend(answer.failed);
                    outcome.buffered.extend(answer.buffered);
                }
                None => outcome.failed.extend(ids),
            }
        }
        outcome
    }

    /// Splits `conn_ids` (each once) by the shard holding them and sends each shard the
    /// command `make` builds for its share. Returns the ids not on this node, and the ids
    /// the shards answered back (not found there, or not delivered).
    async fn to_holders(
        &self,
        conn_ids: &[String],
        make: impl Fn(Vec<String>, oneshot::Sender<Vec<String>>) -> ShardCommand,
    ) -> HolderAnswers {
        let (not_here, answers) = self.send_to_holders(conn_ids, make).await;
        let answered = answers
            .into_iter()
            .flat_map(|(ids, answer)| answer.unwrap_or(ids))
            .collect();
        HolderAnswers { not_here, answered }
    }

    /// Splits `conn_ids` (each once) by the shard holding them and sends each shard the
    /// command `make` builds for its share. Returns the ids not on this node, and each
    /// share with its shard's answer (`None`: the shard ended or is stuck, and delivered
    /// nothing we know of).
    async fn send_to_holders<R>(
        &self,
        conn_ids: &[String],
        make: impl Fn(Vec<String>, oneshot::Sender<R>) -> ShardCommand,
    ) -> (Vec<String>, Vec<(Vec<String>, Option<R>)>) {
        let Split { per_shard, missing } = self.directory.borrow().split_by_shard(conn_ids);
        let mut replies = Vec::new();
        let mut answers = Vec::new();
        for (shard, ids) in per_shard.into_iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let (reply, answer) = oneshot::channel();
            if self.shards[shard].send(make(ids.clone(), reply)) {
                replies.push((shard, ids, answer));
            } else {
                answers.push((ids, None));
            }
        }
        for (shard, ids, answer) in replies {
            answers.push((ids, shard_reply(shard, answer).await));
        }
        (missing, answers)
    }

    /// Sends every shard the command `make` builds and collects the replies.
    async fn to_every_shard<R>(&self, make: impl Fn(oneshot::Sender<R>) -> ShardCommand) -> Vec<R> {
        let mut replies = Vec::with_capacity(self.shards.len());
        for (id, shard) in self.shards.iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            if shard.send(make(reply)) {
                replies.push((id, answer));
            }
        }
        let mut answers = Vec::with_capacity(replies.len());
        for (id, answer) in replies {
            if let Some(answer) = shard_reply(id, answer).await {
                answers.push(answer);
            }
        }
        answers
    }

    /// Delivers `msg` to every client of the node: during a restart, of both processes
    /// (each client is on one of them).
    pub(crate) async fn broadcast(&self, msg: &str, route: Route) -> BroadcastOutcome {
        let message = Message::new(msg.as_bytes());
        let outcomes = self
            .to_every_shard(|reply| ShardCommand::Broadcast {
                message: Arc::clone(&message),
                reply,
            })
            .await;
        bump(&self.counters.broadcasts, 1);
        let here = self.count_outcome(BroadcastOutcome::merge(outcomes));
        self.broadcast_there(here, None, msg, route).await
    }

    /// Delivers `msg` to every member of `group` (encoded once per wire format, for all),
    /// during a restart on both processes.
    pub(crate) async fn group_push(
        &self,
        group: &str,
        msg: &str,
        route: Route,
    ) -> BroadcastOutcome {
        let message = Message::new(msg.as_bytes());
        let outcomes = self
            .to_every_shard(|reply| ShardCommand::GroupPush {
                group: group.to_owned(),
                message: Arc::clone(&message),
                reply,
            })
            .await;
        bump(&self.counters.group_pushes, 1);
        let here = self.count_outcome(BroadcastOutcome::merge(outcomes));
        self.broadcast_there(here, Some(group), msg, route).await
    }

    /// `here`, plus what the other process of a restart delivered of the same broadcast
    /// (or group push). A client moving between the two at that moment may get it twice
    /// or not at all, as any client between connections; without this every client on
    /// the other process missed it, silently.
    async fn broadcast_there(
        &self,
        mut here: BroadcastOutcome,
        group: Option<&str>,
        msg: &str,
        route: Route,
    ) -> BroadcastOutcome {
        let Some(other) = self.forward_target(route) else {
            return here;
        };
        if let Some(there) = other.broadcast(group, msg).await {
            bump(
                &self.counters.forwarded,
                there.delivered + there.failed.len(),
            );
            here.delivered += there.delivered;
            here.failed.extend(there.failed);
        }
        self.drop_gone(&other);
        here
    }

    /// Forgets the predecessor once it refused a connection: it has no clients left.
    fn drop_gone(&self, other: &Rc<Forwarder>) {
        let mut predecessor = self.predecessor.borrow_mut();
        if other.is_gone() && predecessor.as_ref().is_some_and(|p| Rc::ptr_eq(p, other)) {
            predecessor.take();
        }
    }

    /// Whether pushes may be sent on to the other process of a restart now: then every
    /// call of a connection is answered before the next starts, since a later call that
    /// needs no forwarding could otherwise overtake an earlier one that does.
    pub(crate) fn is_forwarding(&self) -> bool {
        self.successor.borrow().is_some() || self.predecessor.borrow().is_some()
    }

    fn count_outcome(&self, outcome: BroadcastOutcome) -> BroadcastOutcome {
        bump(&self.counters.delivered, outcome.delivered);
        bump(&self.counters.failed, outcome.failed.len());
        outcome
    }

    /// Adds these clients to `group`, or removes them (during a restart, on whichever
    /// process holds each); returns the ids not on this node.
    pub(crate) async fn change_group(
        &self,
        change: Membership,
        group: &str,
        conn_ids: &[String],
        route: Route,
    ) -> Vec<String> {
        let not_here = self
            .to_holders(conn_ids, |conn_ids, reply| {
                let group = group.to_owned();
                match change {
                    Membership::Join => ShardCommand::GroupJoin {
                        group,
                        conn_ids,
                        reply,
                    },
                    Membership::Leave => ShardCommand::GroupLeave {
                        group,
                        conn_ids,
                        reply,
                    },
                }
            })
            .await
            .all();
        self.change_group_there(change, group, not_here, route)
            .await
    }

    async fn change_group_there(
        &self,
        change: Membership,
        group: &str,
        not_here: Vec<String>,
        route: Route,
    ) -> Vec<String> {
        match self.forward_target(route).filter(|_| !not_here.is_empty()) {
            Some(other) => {
                bump(&self.counters.forwarded, not_here.len());
                let not_there = other.change_group(change, group, not_here).await;
                self.drop_gone(&other);
                not_there
            }
            None => not_here,
        }
    }

    /// Closes these clients (each gets its `offline`), during a restart on whichever
    /// process holds each (a kicked client must not stay connected because it had not
    /// moved yet); returns the ids not on this node.
    pub(crate) async fn kick(&self, conn_ids: &[String], route: Route) -> Vec<String> {
        bump(&self.counters.kicks, conn_ids.len());
        let not_here = self
            .to_holders(conn_ids, |conn_ids, reply| ShardCommand::Kick {
                conn_ids,
                reason: CloseReason::Kicked,
                reply: Some(reply),
            })
            .await
            .all();
        match self.forward_target(route).filter(|_| !not_here.is_empty()) {
            Some(other) => {
                bump(&self.counters.forwarded, not_here.len());
                other.kick(&not_here).await;
                self.drop_gone(&other);
                // What the other process did not hold is not reported by its answer.
                Vec::new()
            }
            None => not_here,
        }
    }

    /// The subset of `conn_ids` connected to this node.
    pub(crate) fn online(&self, conn_ids: &[String]) -> Vec<String> {
        let directory = self.directory.borrow();
        conn_ids
            .iter()
            .filter(|id| directory.is_connected(id))
            .cloned()
            .collect()
    }

    /// Every conn_id connected to this node.
    pub(crate) fn all_connections(&self) -> Vec<String> {
        self.directory
            .borrow()
            .conn_ids()
            .map(str::to_owned)
            .collect()
    }

    /// A successor serves now: every shard stops announcing sessions (one that registers
    /// from now on is closed at once, unannounced). Returns the conn_ids whose `offline`
    /// is still to come, taken once every shard has stopped: a list from the directory
    /// missed a client that reconnected to this process while it was being taken, and
    /// that client's `online` from here reached the message server after the successor's.
    pub(crate) async fn stop_announcing(&self) -> Vec<String> {
        self.to_every_shard(|reply| ShardCommand::SuccessorServing { reply })
            .await
            .concat()
    }

    /// Figures from every shard.
    pub(crate) async fn shard_stats(&self) -> Vec<ShardStats> {
        self.to_every_shard(|reply| ShardCommand::Stats { reply })
            .await
    }

    /// The node's identity, connection counts and shard figures (the `GetNode` answer).
    pub(crate) async fn describe(&self) -> serde_json::Value {
        let shard_stats = self.shard_stats().await;
        let directory = self.directory.borrow();
        serde_json::json!({
            "rpc_addr": self.config.rpc_addr,
            "comet_addr": self.config.comet_addr(),
            "protocol": self.config.socket_protocol.scheme(),
            "service_name": self.config.comet_service_name,
            "version": env!("CARGO_PKG_VERSION"),
            "start_time": self.started_unix,
            "uptime_secs": self.started.elapsed().as_secs(),
            "connections": directory.len(),
            "connections_per_shard": directory.per_shard(),
            "shards": self.shards.len(),
            "shard_stats": shard_stats,
        })
    }

    /// Everything `Server.Status` reports.
    pub(crate) async fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        json!({
            "node": self.describe().await,
            "pushes": PUSH_COUNTERS
                .iter()
                .map(|k| (k.status.to_owned(), json!((k.of)(c).get())))
                .collect::<serde_json::Map<_, _>>(),
            "callbacks": self.callback_stats.figures(),
            "presence_backlog": self.presence.backlog(),
            "rpc_open_to_anyone": self.config.rpc_open_to_anyone(),
            "registration": match &self.registrar {
                Some(registrar) => serde_json::to_value(registrar.status()).unwrap_or_default(),
                None => json!({"state": "standalone"}),
            },
            "load": {
                "sample": self.last_sample.get(),
                "state": self.load_state(),
            },
        })
    }

    /// Why the node should not get new clients now (`/readyz`), if it should not: the
    /// reasons of [`Node::not_ready_because`], or a shard that does not answer a ping
    /// within a second.
    pub(crate) async fn readiness(&self) -> Option<String> {
        // A probe this process accepted just before handing over: it asked whether the
        // address serves, and it does (the successor holds the listeners). "draining"
        // would make a load balancer pull a node that is serving.
        if self.handed_over.get() {
            return None;
        }
        if let Some(why) = self.not_ready_because() {
            return Some(why.to_owned());
        }
        self.unanswering_shard(SHARD_PROBE_TIMEOUT)
            .await
            .map(|id| format!("shard {id} not answering"))
    }

    /// The first shard that does not answer a ping through its inbox within `limit`
    /// (all are pinged at once, so the whole probe takes at most `limit`).
    pub(crate) async fn unanswering_shard(&self, limit: Duration) -> Option<usize> {
        let mut pings = Vec::with_capacity(self.shards.len());
        for shard in &self.shards {
            let (reply, answer) = oneshot::channel();
            shard.send(ShardCommand::Ping { reply });
            pings.push(answer);
        }
        let deadline = tokio::time::Instant::now() + limit;
        for (id, answer) in pings.into_iter().enumerate() {
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(())) => {}
                _ => return Some(id),
            }
        }
        None
    }

    /// Why the node should not get new clients now, from what the control thread knows
    /// without asking the shards.
    pub(crate) fn not_ready_because(&self) -> Option<&'static str> {
        let load = self.load_state();
        if self.draining.get() {
            Some("draining")
        } else if load.overloaded || load.refusing {
            Some("overloaded")
        } else {
            None
        }
    }

    /// The Prometheus exposition (`/metrics`).
    pub(crate) async fn metrics(&self) -> String {
        let shards = self.shard_stats().await;
        let c = &self.counters;
        let pushes: Vec<(&str, &str, u64)> = PUSH_COUNTERS
            .iter()
            .map(|k| (k.metric, k.help, (k.of)(c).get()))
            .collect();
        let registration = self.registrar.as_ref().map(Registrar::status);
        let process = tokio::task::spawn_blocking(process::ProcessFigures::read)
            .await
            .unwrap_or_default();
        metrics::render(&metrics::Figures {
            process: &process,
            shards: &shards,
            pushes: &pushes,
            callbacks: &self.callback_stats.figures(),
            push_latency: &self.counters.latency.snapshot(),
            registered: registration.as_ref().map(|r| r.state == "registered"),
            registrations: registration.map_or(0, |r| r.registrations),
            load: self.load_state(),
            uptime_secs: self.started.elapsed().as_secs(),
            draining: self.draining.get(),
            presence_backlog: self.presence.backlog() as u64,
        })
    }

    /// Counts one push call's time, from its request read to its answer.
    pub(crate) fn observe_push_latency(&self, elapsed: Duration) {
        self.counters.latency.observe(elapsed);
    }

    /// A successor serves now: from here on `/readyz` answers ready for the probes this
    /// process accepted before (the address they probed is served, by the successor), and
    /// the pushes this process cannot deliver go to the successor at `forward` (`None`:
    /// an older successor that did not say where).
    pub(crate) fn handed_over(&self, forward: Option<crate::handover::ForwardTarget>) {
        self.handed_over.set(true);
        match forward {
            Some(target) => {
                tracing::info!(successor_rpc = %target.addr, "pushes for clients not held here go to the successor");
                let forwarder = Rc::new(Forwarder::new(target));
                *self.successor.borrow_mut() = Some(Rc::clone(&forwarder));
                tokio::task::spawn_local(async move { forwarder.open().await });
            }
            None => tracing::warn!(
                "the successor did not say where its push RPC answers: pushes for clients that moved are reported failed"
            ),
        }
    }

    /// Tells every RPC connection to close once idle (every call it read answered), so
    /// that its client reconnects to the successor, which holds the listener now.
    pub(crate) fn move_rpc_clients(&self) {
        self.rpc_moving.send_replace(true);
    }

    /// What an RPC connection watches to learn that it should move
    /// ([`Node::move_rpc_clients`]); its count is the number of open RPC connections.
    pub(crate) fn rpc_moving(&self) -> watch::Receiver<bool> {
        self.rpc_moving.subscribe()
    }

    /// RPC connections still open (each holds one [`Node::rpc_moving`] receiver).
    pub(crate) fn rpc_connections(&self) -> usize {
        self.rpc_moving.receiver_count()
    }

    /// Held by an admin request until it is answered ([`Node::admin_requests`]).
    pub(crate) fn admin_request(&self) -> watch::Receiver<()> {
        self.admin_requests.subscribe()
    }

    /// Admin requests accepted and not yet answered: a process that handed over answers
    /// them before it exits (a probe accepted just before must not be dropped).
    pub(crate) fn admin_requests(&self) -> usize {
        self.admin_requests.receiver_count()
    }

    /// Tells every shard to close its clients and stop.
    pub(crate) fn shutdown_shards(&self) {
        self.draining.set(true);
        for shard in &self.shards {
            shard.send(ShardCommand::Shutdown);
        }
    }
}
