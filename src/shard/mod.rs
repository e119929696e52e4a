//! Shards: one glommio executor pinned per core, each owning its listener, its session
//! table and every connection accepted on it for that connection's whole life.
//!
//! A shard never blocks and never shares its table: the control thread reaches it only
//! through its [`ShardHandle`] (a crossbeam channel plus a waker), and it reaches the
//! control thread only through non-blocking sends. Blocking work (`checkToken`) runs on
//! the shard's blocking pool, presence callbacks on the presence workers.

pub mod inbox;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHashSet};
use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::TcpListener;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use tokio::sync::oneshot;

use crate::callback::CallbackClient;
use crate::codec::{Message, Wire, json};
use crate::config::Config;
use crate::control::{ControlLink, DirectoryRequest};
use crate::presence::{Presence, PresenceKind};
use crate::session::{CloseReason, Delivery, Session};
use crate::token::TokenVerifier;
use crate::transport::Entry;
use crate::transport::ws::frame::EncodedFrame;

pub use inbox::ShardHandle;

/// Bytes read from a socket per read call; shared by every connection of a shard, so an
/// idle connection holds no read buffer at all.
const SCRATCH_BYTES: usize = 16 * 1024;
/// Longest pause of the acceptor after running out of descriptors.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Work the control thread hands to a shard.
pub enum ShardCommand {
    /// Deliver one message to these conn_ids; reply with the ones not delivered.
    Push {
        message: Arc<Message>,
        conn_ids: Vec<String>,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// Deliver one message to every session; reply with the counts.
    Broadcast {
        message: Arc<Message>,
        reply: oneshot::Sender<BroadcastOutcome>,
    },
    /// Close these sessions; reply (when asked) with the conn_ids not found here.
    Kick {
        conn_ids: Vec<String>,
        reason: CloseReason,
        reply: Option<oneshot::Sender<Vec<String>>>,
    },
    /// Add these sessions to a group; reply with the conn_ids not found here.
    GroupJoin {
        group: String,
        conn_ids: Vec<String>,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// Remove these sessions from a group; reply with the conn_ids not found here.
    GroupLeave {
        group: String,
        conn_ids: Vec<String>,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// Deliver one message to every member of a group on this shard.
    GroupPush {
        group: String,
        message: Arc<Message>,
        reply: oneshot::Sender<BroadcastOutcome>,
    },
    /// Report this shard's figures.
    Stats { reply: oneshot::Sender<ShardStats> },
    /// Answer at once: the liveness probe behind `/readyz`.
    Ping { reply: oneshot::Sender<()> },
    /// Stop accepting, close every session with 1001 spread over `drain_window`, then
    /// end the executor. Pushes are still served to sessions not yet closed.
    Shutdown,
    /// Sent by the shard to itself when its drain has finished.
    Drained,
}

/// What a broadcast did on one shard.
#[derive(Debug, Default, Clone)]
pub struct BroadcastOutcome {
    /// Sessions that accepted the message.
    pub delivered: usize,
    /// Sessions that did not (closing or slow consumers).
    pub failed: Vec<String>,
}

impl BroadcastOutcome {
    /// Sums the outcomes of several shards.
    pub fn merge(outcomes: impl IntoIterator<Item = BroadcastOutcome>) -> BroadcastOutcome {
        let mut total = BroadcastOutcome::default();
        for outcome in outcomes {
            total.delivered += outcome.delivered;
            total.failed.extend(outcome.failed);
        }
        total
    }
}

/// One shard's figures.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ShardStats {
    /// Shard index.
    pub shard: usize,
    /// Sessions in the table.
    pub connections: usize,
    /// Sessions in the table by the framing they speak (`websocket`, `json`, `resp`).
    pub connections_by_transport: BTreeMap<&'static str, usize>,
    /// Messages waiting in outbound queues.
    pub queued_messages: usize,
    /// Bytes waiting in outbound queues (pushes and replies).
    pub queued_bytes: usize,
    /// Connections accepted (handshake or not).
    pub accepted: u64,
    /// Accepts refused because descriptors ran out.
    pub accept_fd_exhausted: u64,
    /// Clients upgraded.
    pub upgraded: u64,
    /// Handshakes refused, by reason.
    pub handshake_refusals: BTreeMap<&'static str, u64>,
    /// Deliveries that failed here, by reason (`unknown`, `closed`, `queue_full`).
    pub delivery_failures: BTreeMap<&'static str, u64>,
    /// Connection tasks that panicked (each closed that connection only).
    pub connection_panics: u64,
}

/// Everything a shard owns. Lives on the shard's thread only.
pub struct Shard {
    /// Shard index.
    pub id: usize,
    /// The node configuration.
    pub config: Arc<Config>,
    /// Claims and releases of conn_ids.
    pub control: ControlLink,
    /// Presence callbacks.
    pub presence: Presence,
    /// `checkToken` client; `None` when no message server is configured.
    pub callbacks: Option<CallbackClient>,
    /// Local verifier of signed tokens (skips `checkToken`).
    pub verifier: Option<TokenVerifier>,
    refuse_new_clients: Arc<AtomicBool>,
    sessions: RefCell<AHashMap<Rc<str>, Rc<Session>>>,
    groups: RefCell<AHashMap<Rc<str>, AHashSet<Rc<str>>>>,
    scratch: RefCell<Box<[u8]>>,
    draining: Cell<bool>,
    live_connections: Cell<usize>,
    websocket_ping: Arc<[u8]>,
    json_ping: Arc<[u8]>,
    sse_keepalive: Arc<[u8]>,
    accepted: Cell<u64>,
    accept_fd_exhausted: Cell<u64>,
    upgraded: Cell<u64>,
    handshake_refusals: RefCell<BTreeMap<&'static str, u64>>,
    delivery_failures: RefCell<BTreeMap<&'static str, u64>>,
    connection_panics: Cell<u64>,
}

/// Held by a connection task for its whole life, so shutdown knows when all are done.
pub struct LiveConnection(Rc<Shard>);

impl LiveConnection {
    /// The shard the connection lives on.
    pub fn shard(&self) -> &Rc<Shard> {
        &self.0
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0
            .live_connections
            .set(self.0.live_connections.get() - 1);
    }
}

/// What the shard threads need from the process.
#[derive(Clone)]
pub struct ShardDeps {
    /// The node configuration.
    pub config: Arc<Config>,
    /// Link to the control thread's directory.
    pub control: ControlLink,
    /// Presence callbacks.
    pub presence: Presence,
    /// `checkToken` client.
    pub callbacks: Option<CallbackClient>,
    /// Set by the control thread's load self-check past a hard threshold.
    pub refuse_new_clients: Arc<AtomicBool>,
    /// Local verifier of signed tokens; `None`: tokens go to `checkToken`.
    pub verifier: Option<TokenVerifier>,
}

/// Why the shards could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start shard {shard}: {reason}")]
    Executor { shard: usize, reason: String },
}

/// The running shards: handles for the control thread, threads for `main` to join.
pub struct Shards {
    /// One per shard, indexed by shard id.
    pub handles: Vec<ShardHandle>,
    /// The executor threads.
    pub threads: Vec<glommio::ExecutorJoinHandle<()>>,
}

/// The listeners of one client port (one per shard, bound with SO_REUSEPORT or
/// inherited) and what connections accepted on them speak.
pub struct ListenerGroup {
    /// What the port serves.
    pub entry: Entry,
    /// The listening sockets.
    pub fds: Vec<OwnedFd>,
}

/// Starts `config.max_proc` shards on the given client ports: the `j`-th listener of
/// each port goes to shard `j % max_proc`, so every listener has a shard accepting on it
/// and every shard accepts on every port when there are enough. Waits until all shards
/// run.
pub fn start(deps: ShardDeps, ports: Vec<ListenerGroup>) -> Result<Shards, StartError> {
    let count = deps.config.max_proc;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut per_shard: Vec<Vec<(RawFd, Entry)>> = vec![Vec::new(); count];
    for port in ports {
        for (j, fd) in port.fds.into_iter().enumerate() {
            // Ownership moves to the shard's glommio listener, which closes it.
            per_shard[j % count].push((fd.into_raw_fd(), port.entry.clone()));
        }
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(count);
    let mut threads = Vec::with_capacity(count);
    for (id, fds) in per_shard.into_iter().enumerate() {
        let (handle, inbox) = inbox::channel();
        let own_handle = handle.clone();
        let deps = deps.clone();
        let ready = ready_tx.clone();
        let thread = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("shard-{id}"))
            .ring_depth(deps.config.io_uring_depth)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(deps.config.callback_threads))
            .spawn(move || async move {
                // SAFETY: each descriptor is a listening socket whose ownership was given
                // to this shard alone above.
                let listeners = fds
                    .into_iter()
                    .map(|(fd, entry)| (unsafe { TcpListener::from_raw_fd(fd) }, entry))
                    .collect();
                let _ = ready.send(());
                run(Rc::new(Shard::new(id, deps)), listeners, inbox, own_handle).await;
            })
            .map_err(|e| StartError::Executor {
                shard: id,
                reason: e.to_string(),
            })?;
        handles.push(handle);
        threads.push(thread);
    }
    drop(ready_tx);
    for _ in 0..count {
        if ready_rx.recv().is_err() {
            return Err(StartError::Executor {
                shard: 0,
                reason: "a shard thread ended during start-up".into(),
            });
        }
    }
    Ok(Shards { handles, threads })
}

async fn run(
    shard: Rc<Shard>,
    listeners: Vec<(TcpListener, Entry)>,
    inbox: inbox::Inbox,
    own: ShardHandle,
) {
    // Long-running tasks end by returning when their stop channel closes, not by
    // `Task::cancel`: a cancelled glommio task is never freed (LeakSanitizer reports it
    // and its task queue at exit).
    let (stop_accepting, accepting) = local_channel::new_bounded(1);
    let accepting = Rc::new(accepting);
    let mut acceptors: Vec<_> = listeners
        .into_iter()
        .map(|(listener, entry)| {
            let stop = Rc::clone(&accepting);
            glommio::spawn_local(accept_loop(Rc::clone(&shard), listener, entry, stop))
        })
        .collect();
    let mut stop_accepting = Some(stop_accepting);
    let (stop_beating, beating) = local_channel::new_bounded(1);
    let heartbeat = glommio::spawn_local(heartbeat_loop(Rc::clone(&shard), beating));
    while let Some(command) = inbox.recv().await {
        match command {
            ShardCommand::Shutdown => {
                if stop_accepting.take().is_some() {
                    for acceptor in acceptors.drain(..) {
                        acceptor.await;
                    }
                    let draining = Rc::clone(&shard);
                    let own = own.clone();
                    glommio::spawn_local(async move {
                        draining.drain().await;
                        own.send(ShardCommand::Drained);
                    })
                    .detach();
                }
            }
            ShardCommand::Drained => break,
            command => shard.handle(command),
        }
    }
    drop(stop_beating);
    heartbeat.await;
}

/// Waits until the sender side of `stop` is dropped.
async fn stopped(stop: &LocalReceiver<()>) {
    while stop.recv().await.is_some() {}
}

async fn accept_loop(
    shard: Rc<Shard>,
    listener: TcpListener,
    entry: Entry,
    stop: Rc<LocalReceiver<()>>,
) {
    let mut backoff = Duration::from_millis(1);
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            stopped(&stop).await;
            None
        })
        .await;
        let Some(accepted) = accepted else {
            return;
        };
        match accepted {
            Ok(stream) => {
                backoff = Duration::from_millis(1);
                shard.accepted.set(shard.accepted.get() + 1);
                let live = shard.connection_started();
                crate::transport::spawn(live, stream, &entry);
            }
            Err(err) => {
                let err: io::Error = err.into();
                // glommio returns EMFILE without yielding: retrying at once would spin the
                // core and starve every other task here, so back off on a timer.
                if matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                    shard
                        .accept_fd_exhausted
                        .set(shard.accept_fd_exhausted.get() + 1);
                    if backoff == Duration::from_millis(1) {
                        tracing::warn!(shard = shard.id, error = %err, "out of file descriptors; accept backing off");
                    }
                } else {
                    tracing::warn!(shard = shard.id, error = %err, "accept failed");
                }
                Timer::new(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

async fn heartbeat_loop(shard: Rc<Shard>, stop: LocalReceiver<()>) {
    let tick = heartbeat_tick(&shard.config);
    loop {
        let ticked = futures_lite::future::or(
            async {
                Timer::new(tick).await;
                true
            },
            async {
                stopped(&stop).await;
                false
            },
        )
        .await;
        if !ticked {
            return;
        }
        shard.sweep(Instant::now());
    }
}

/// How often sessions are checked: fine enough that a drop lands within a few percent of
/// the configured window, coarse enough to cost nothing at 9 s / 10 s.
fn heartbeat_tick(config: &Config) -> Duration {
    let slack = config.heartbeat_timeout - config.ping_interval;
    (config.ping_interval.min(slack) / 4)
        .clamp(Duration::from_millis(10), Duration::from_millis(500))
}

impl Shard {
    fn new(id: usize, deps: ShardDeps) -> Shard {
        Shard {
            id,
            config: deps.config,
            control: deps.control,
            presence: deps.presence,
            callbacks: deps.callbacks,
            refuse_new_clients: deps.refuse_new_clients,
            verifier: deps.verifier,
            sessions: RefCell::new(AHashMap::new()),
            groups: RefCell::new(AHashMap::new()),
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            draining: Cell::new(false),
            live_connections: Cell::new(0),
            websocket_ping: EncodedFrame::ping().bytes().into(),
            json_ping: Arc::from(json::PING_LINE),
            sse_keepalive: Arc::from(crate::codec::sse::KEEPALIVE),
            accepted: Cell::new(0),
            accept_fd_exhausted: Cell::new(0),
            upgraded: Cell::new(0),
            handshake_refusals: RefCell::new(BTreeMap::new()),
            delivery_failures: RefCell::new(BTreeMap::new()),
            connection_panics: Cell::new(0),
        }
    }

    fn connection_started(self: &Rc<Self>) -> LiveConnection {
        self.live_connections.set(self.live_connections.get() + 1);
        LiveConnection(Rc::clone(self))
    }

    /// The shard-wide read buffer. Borrow it only within one poll, never across an await.
    pub fn scratch(&self) -> std::cell::RefMut<'_, Box<[u8]>> {
        self.scratch.borrow_mut()
    }

    /// Whether the shard is shutting down (a client registered now is closed at once).
    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Whether the node is past a hard load threshold (new handshakes get 503).
    pub fn is_saturated(&self) -> bool {
        self.refuse_new_clients.load(Ordering::Relaxed)
    }

    /// Counts a refused handshake under its reason.
    pub fn handshake_refused(&self, reason: &'static str) {
        *self
            .handshake_refusals
            .borrow_mut()
            .entry(reason)
            .or_default() += 1;
    }

    /// Counts a delivery that failed, under its reason.
    fn delivery_failed(&self, delivery: Option<Delivery>) {
        let reason = match delivery {
            None => "unknown",
            Some(Delivery::Overflow) => "queue_full",
            Some(_) => "closed",
        };
        *self
            .delivery_failures
            .borrow_mut()
            .entry(reason)
            .or_default() += 1;
    }

    /// A connection's task panicked and was dropped (`panics`): counts it, and ends the
    /// session it held, if any, as the task would have (its `offline`, its conn_id).
    pub fn connection_panicked(&self) {
        self.connection_panics.set(self.connection_panics.get() + 1);
        self.reap_orphans();
    }

    /// Unregisters sessions whose connection task is gone. Every registered session is
    /// held by its task until the task unregisters it, so one held by the table alone
    /// lost its task to a panic.
    fn reap_orphans(&self) {
        let orphans: Vec<Rc<Session>> = self
            .sessions
            .borrow()
            .values()
            .filter(|session| Rc::strong_count(session) == 1)
            .cloned()
            .collect();
        for session in orphans {
            self.unregister(&session, &CloseReason::InternalError);
        }
    }

    /// Puts an upgraded client in the table and reports it online.
    pub fn register(&self, session: &Rc<Session>) {
        self.sessions
            .borrow_mut()
            .insert(Rc::clone(&session.conn_id), Rc::clone(session));
        self.upgraded.set(self.upgraded.get() + 1);
        self.presence
            .report(PresenceKind::Online, &session.conn_id, &session.info);
        tracing::debug!(shard = self.id, conn_id = ?session.conn_id, "client online");
        crate::fault::panic_if_named("REGISTER", &session.conn_id);
        if self.is_draining() {
            // Accepted before the shard stopped accepting; its handshake ended after.
            session.request_close(CloseReason::Shutdown);
        }
    }

    /// Takes an ended session out of the table, reports it offline and frees its conn_id.
    /// The `offline` is queued before the release so that a reconnect's `online` follows it.
    pub fn unregister(&self, session: &Rc<Session>, reason: &CloseReason) {
        let mut sessions = self.sessions.borrow_mut();
        if sessions
            .get(&session.conn_id)
            .is_some_and(|s| Rc::ptr_eq(s, session))
        {
            sessions.remove(&session.conn_id);
        }
        drop(sessions);
        self.leave_all_groups(session);
        self.presence
            .report(PresenceKind::Offline, &session.conn_id, &session.info);
        self.control.send(DirectoryRequest::Release {
            conn_id: session.conn_id.to_string(),
            shard: self.id,
        });
        tracing::debug!(shard = self.id, conn_id = ?session.conn_id, reason = reason.label(), "client offline");
    }

    fn handle(&self, command: ShardCommand) {
        match command {
            ShardCommand::Push {
                message,
                conn_ids,
                reply,
            } => {
                let _ = reply.send(self.push(&message, conn_ids));
            }
            ShardCommand::Broadcast { message, reply } => {
                let _ = reply.send(self.broadcast(&message));
            }
            ShardCommand::Kick {
                conn_ids,
                reason,
                reply,
            } => {
                let missing = self.kick(conn_ids, &reason);
                if let Some(reply) = reply {
                    let _ = reply.send(missing);
                }
            }
            ShardCommand::GroupJoin {
                group,
                conn_ids,
                reply,
            } => {
                let _ = reply.send(self.join_group(&group, conn_ids));
            }
            ShardCommand::GroupLeave {
                group,
                conn_ids,
                reply,
            } => {
                let _ = reply.send(self.leave_group(&group, conn_ids));
            }
            ShardCommand::GroupPush {
                group,
                message,
                reply,
            } => {
                let _ = reply.send(self.group_push(&group, &message));
            }
            ShardCommand::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            ShardCommand::Ping { reply } => {
                let _ = reply.send(());
            }
            ShardCommand::Shutdown | ShardCommand::Drained => {}
        }
    }

    fn join_group(&self, group: &str, conn_ids: Vec<String>) -> Vec<String> {
        let sessions = self.sessions.borrow();
        let mut groups = self.groups.borrow_mut();
        let name: Rc<str> = match groups.get_key_value(group) {
            Some((name, _)) => Rc::clone(name),
            None => group.into(),
        };
        let members = groups.entry(Rc::clone(&name)).or_default();
        let missing = conn_ids
            .into_iter()
            .filter(|id| match sessions.get(id.as_str()) {
                Some(session) => {
                    if members.insert(Rc::clone(&session.conn_id)) {
                        session.joined(Rc::clone(&name));
                    }
                    false
                }
                None => true,
            })
            .collect();
        if members.is_empty() {
            groups.remove(group);
        }
        missing
    }

    fn leave_group(&self, group: &str, conn_ids: Vec<String>) -> Vec<String> {
        let sessions = self.sessions.borrow();
        let mut groups = self.groups.borrow_mut();
        let missing = conn_ids
            .into_iter()
            .filter(|id| {
                let Some(session) = sessions.get(id.as_str()) else {
                    return true;
                };
                if let Some(members) = groups.get_mut(group) {
                    members.remove(id.as_str());
                }
                session.left(group);
                false
            })
            .collect();
        if groups.get(group).is_some_and(|members| members.is_empty()) {
            groups.remove(group);
        }
        missing
    }

    fn leave_all_groups(&self, session: &Session) {
        let mut groups = self.groups.borrow_mut();
        for group in session.take_groups() {
            if let Some(members) = groups.get_mut(&group) {
                members.remove(&session.conn_id);
                if members.is_empty() {
                    groups.remove(&group);
                }
            }
        }
    }

    fn group_push(&self, group: &str, message: &Arc<Message>) -> BroadcastOutcome {
        let mut outcome = BroadcastOutcome::default();
        let groups = self.groups.borrow();
        let Some(members) = groups.get(group) else {
            return outcome;
        };
        let sessions = self.sessions.borrow();
        for member in members {
            if self.deliver_to(sessions.get(member), message) {
                outcome.failed.push(member.to_string());
            } else {
                outcome.delivered += 1;
            }
        }
        outcome
    }

    fn push(&self, message: &Arc<Message>, conn_ids: Vec<String>) -> Vec<String> {
        for id in &conn_ids {
            crate::fault::panic_if_named("PUSH", id);
        }
        let sessions = self.sessions.borrow();
        conn_ids
            .into_iter()
            .filter(|id| self.deliver_to(sessions.get(id.as_str()), message))
            .collect()
    }

    /// Delivers to one session (if there is one); true when that failed.
    fn deliver_to(&self, session: Option<&Rc<Session>>, message: &Arc<Message>) -> bool {
        let delivery = session.map(|s| s.deliver(message));
        let failed = !delivery.is_some_and(Delivery::accepted);
        if failed {
            self.delivery_failed(delivery);
        }
        failed
    }

    fn broadcast(&self, message: &Arc<Message>) -> BroadcastOutcome {
        let mut outcome = BroadcastOutcome::default();
        for session in self.sessions.borrow().values() {
            if self.deliver_to(Some(session), message) {
                outcome.failed.push(session.conn_id.to_string());
            } else {
                outcome.delivered += 1;
            }
        }
        outcome
    }

    fn kick(&self, conn_ids: Vec<String>, reason: &CloseReason) -> Vec<String> {
        let sessions = self.sessions.borrow();
        conn_ids
            .into_iter()
            .filter(|id| match sessions.get(id.as_str()) {
                Some(session) => {
                    session.request_close(reason.clone());
                    false
                }
                None => true,
            })
            .collect()
    }

    fn stats(&self) -> ShardStats {
        let sessions = self.sessions.borrow();
        let mut connections_by_transport: BTreeMap<&'static str, usize> =
            [Wire::WebSocket, Wire::JsonLines, Wire::Resp, Wire::Sse]
                .into_iter()
                .map(|wire| (wire.label(), 0))
                .collect();
        for session in sessions.values() {
            *connections_by_transport
                .entry(session.wire().label())
                .or_default() += 1;
        }
        ShardStats {
            shard: self.id,
            connections: sessions.len(),
            connections_by_transport,
            queued_messages: sessions.values().map(|s| s.backlog_messages()).sum(),
            queued_bytes: sessions.values().map(|s| s.backlog_bytes()).sum(),
            accepted: self.accepted.get(),
            accept_fd_exhausted: self.accept_fd_exhausted.get(),
            upgraded: self.upgraded.get(),
            handshake_refusals: self.handshake_refusals.borrow().clone(),
            delivery_failures: self.delivery_failures.borrow().clone(),
            connection_panics: self.connection_panics.get(),
        }
    }

    /// Pings sessions that have been quiet for a ping interval; closes those silent past
    /// the heartbeat timeout. RESP sessions are left to TCP keepalive: Redis clients do
    /// not answer a server's ping. A session over its byte budget is not read from, so it
    /// goes silent too: one that stays over for a heartbeat timeout, whatever it speaks,
    /// is a slow consumer.
    fn sweep(&self, now: Instant) {
        let config = &self.config;
        for session in self.sessions.borrow().values() {
            let silent = now.saturating_duration_since(session.last_seen());
            if silent > config.heartbeat_timeout && session.is_over_budget() {
                session.request_close(CloseReason::SlowConsumer);
                continue;
            }
            let ping = match session.wire() {
                Wire::WebSocket | Wire::WebSocketDeflate(_) => &self.websocket_ping,
                Wire::JsonLines => &self.json_ping,
                Wire::Resp => continue,
                Wire::Sse => {
                    // An event stream never answers: its comment keeps proxies from timing
                    // out; a dead peer fails the writes or fills the queue.
                    if now.saturating_duration_since(session.last_ping()) >= config.ping_interval {
                        session.send_control(&self.sse_keepalive);
                        session.pinged(now);
                    }
                    continue;
                }
            };
            if silent > config.heartbeat_timeout {
                session.request_close(CloseReason::HeartbeatTimeout);
            } else if silent >= config.ping_interval
                && now.saturating_duration_since(session.last_ping()) >= config.ping_interval
            {
                session.send_control(ping);
                session.pinged(now);
            }
        }
    }

    /// Closes every session with "going away", spread evenly over `drain_window` so that
    /// clients do not all reconnect at once, and waits for their tasks to finish (bounded).
    async fn drain(&self) {
        self.draining.set(true);
        let sessions: Vec<Rc<Session>> = self.sessions.borrow().values().cloned().collect();
        let window = self.config.drain_window.as_secs_f64();
        let started = Instant::now();
        let mut closed = 0;
        while closed < sessions.len() {
            let share = if window > 0.0 {
                started.elapsed().as_secs_f64() / window
            } else {
                1.0
            };
            let due = ((share * sessions.len() as f64).ceil() as usize).min(sessions.len());
            for session in sessions.get(closed..due).unwrap_or_default() {
                session.request_close(CloseReason::Shutdown);
            }
            closed = closed.max(due);
            if closed < sessions.len() {
                Timer::new(Duration::from_millis(10)).await;
            }
        }
        let limit = self.config.handshake_timeout + self.config.close_timeout * 2;
        let deadline = Instant::now() + limit;
        while self.live_connections.get() > 0 && Instant::now() < deadline {
            Timer::new(Duration::from_millis(10)).await;
        }
        if self.live_connections.get() > 0 {
            tracing::warn!(
                shard = self.id,
                left = self.live_connections.get(),
                "shutdown: connections still open at the deadline"
            );
        }
        // A task that panicked while `sessions` above held its session left it behind.
        drop(sessions);
        self.reap_orphans();
    }
}
