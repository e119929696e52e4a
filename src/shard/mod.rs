//! Shards: one glommio executor pinned per core, each owning its listener, its session
//! table and every connection accepted on it for that connection's whole life.
//!
//! A shard never blocks and never shares its table: the control thread reaches it only
//! through its `link::ShardHandle` (a crossbeam channel plus a waker), and it reaches the
//! control thread only through non-blocking sends. Blocking work (`checkToken`) runs on
//! the shard's blocking pool, presence callbacks on the presence workers.

mod recovery;
mod table;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use glommio::channels::local_channel::{self, LocalReceiver};
use glommio::net::TcpListener;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};

use crate::callback::CallbackClient;
use crate::codec::frame::EncodedFrame;
use crate::codec::{Message, json};
use crate::config::Config;
use crate::link::{
    self, ControlLink, DirectoryRequest, PushOutcome, ShardCommand, ShardHandle, ShardStats,
};
use crate::presence::{Presence, PresenceKind};
use crate::session::{CloseReason, Session};
use crate::token::TokenVerifier;
use crate::transport::Entry;
use crate::transport::admission::{ClientCounts, HandshakesBySource, handshake_slot};

use table::{Heartbeat, Pings, SessionTable};

/// Bytes read from a socket per read call; shared by every connection of a shard, so an
/// idle connection holds no read buffer at all.
const SCRATCH_BYTES: usize = 16 * 1024;
/// How long a shard runs ready tasks before it polls its ring again. A client that keeps
/// its socket full is always ready (`transport::READS_PER_POLL` makes it yield, not
/// sleep), and at glommio's default of 100 ms every other socket of its shard waited that
/// long to be seen: pushes to other clients 80-97 ms, pongs up to 242 ms, new upgrades
/// 201 ms at p50 under one such flood.
const PREEMPT_TIMER: Duration = Duration::from_millis(5);
/// Longest pause of the acceptor after running out of descriptors.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Everything a shard owns. Lives on the shard's thread only.
pub(crate) struct Shard {
    /// Shard index.
    pub(crate) id: usize,
    /// The node configuration.
    pub(crate) config: Arc<Config>,
    /// Claims and releases of conn_ids.
    pub(crate) control: ControlLink,
    /// Presence callbacks.
    pub(crate) presence: Presence,
    /// `checkToken` client; `None` when no message server is configured.
    pub(crate) callbacks: Option<CallbackClient>,
    /// Local verifier of signed tokens (skips `checkToken`).
    pub(crate) verifier: Option<TokenVerifier>,
    refuse_new_clients: Arc<AtomicBool>,
    table: RefCell<SessionTable>,
    /// Connections still in their handshake, by source address.
    pub(crate) handshakes_by_source: HandshakesBySource,
    /// RESP connections past `AUTH`, by conn_id (each conn_id's are bounded).
    pub(crate) resp_authenticated: Rc<crate::transport::tcp::resp::Authenticated>,
    /// Shared by all shards: the exact connection bound, the descriptor reserve.
    pub(crate) counts: Arc<ClientCounts>,
    scratch: RefCell<Box<[u8]>>,
    replies: RefCell<Vec<u8>>,
    draining: Cell<bool>,
    live_connections: Cell<usize>,
    pings: Pings,
    accepted: Cell<u64>,
    accept_fd_exhausted: Cell<u64>,
    accept_fd_reserve: Cell<u64>,
    upgraded: Cell<u64>,
    handshake_refusals: RefCell<BTreeMap<&'static str, u64>>,
    connection_panics: Cell<u64>,
}

/// Held by a connection task for its whole life, so shutdown knows when all are done.
pub(crate) struct LiveConnection(Rc<Shard>);

impl LiveConnection {
    /// The shard the connection lives on.
    pub(crate) fn shard(&self) -> &Rc<Shard> {
        &self.0
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.0
            .live_connections
            .set(self.0.live_connections.get() - 1);
        self.0.counts.socket_closed();
    }
}

/// What the shard threads need from the process.
#[derive(Clone)]
pub(crate) struct ShardDeps {
    /// The node configuration.
    pub(crate) config: Arc<Config>,
    /// Link to the control thread's directory.
    pub(crate) control: ControlLink,
    /// Presence callbacks.
    pub(crate) presence: Presence,
    /// `checkToken` client.
    pub(crate) callbacks: Option<CallbackClient>,
    /// Set by the control thread's load self-check past a hard threshold.
    pub(crate) refuse_new_clients: Arc<AtomicBool>,
    /// Local verifier of signed tokens; `None`: tokens go to `checkToken`.
    pub(crate) verifier: Option<TokenVerifier>,
}

/// Why the shards could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error("cannot start shard {shard}: {reason}")]
    Executor { shard: usize, reason: String },
}

/// The running shards: handles for the control thread, threads for `main` to join.
pub(crate) struct Shards {
    /// One per shard, indexed by shard id.
    pub(crate) handles: Vec<ShardHandle>,
    /// The executor threads.
    pub(crate) threads: Vec<glommio::ExecutorJoinHandle<()>>,
}

/// The listeners of one client port (one per shard, bound with SO_REUSEPORT or
/// inherited) and what connections accepted on them speak.
pub(crate) struct ListenerGroup {
    /// What the port serves.
    pub(crate) entry: Entry,
    /// The listening sockets.
    pub(crate) fds: Vec<OwnedFd>,
}

/// Starts `config.max_proc` shards on the given client ports: the `j`-th listener of
/// each port goes to shard `j % max_proc`, so every listener has a shard accepting on it
/// and every shard accepts on every port when there are enough. Waits until all shards
/// run.
/// Longest a shard may take to start (its ring, its threads): a node whose shard hangs
/// there exits with an error instead of never logging "comet ready" (shards start in
/// ~1.5 s with twenty nodes starting at once on this 2-core machine).
const SHARD_START_LIMIT: Duration = Duration::from_secs(20);

pub(crate) fn start(deps: ShardDeps, ports: Vec<ListenerGroup>) -> Result<Shards, StartError> {
    let count = deps.config.max_proc;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut per_shard: Vec<Vec<(RawFd, Entry)>> = vec![Vec::new(); count];
    for port in ports {
        for (j, fd) in port.fds.into_iter().enumerate() {
            // Ownership moves to the shard's glommio listener, which closes it.
            per_shard[j % count].push((fd.into_raw_fd(), port.entry.clone()));
        }
    }
    // Unknown: no reserve can be kept, and accepting stops only at EMFILE.
    let nofile = crate::sys::nofile_soft_limit().map_or(usize::MAX, |n| n as usize);
    let counts = Arc::new(ClientCounts::new(nofile, deps.config.fd_reserve));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(count);
    let mut threads = Vec::with_capacity(count);
    for (id, fds) in per_shard.into_iter().enumerate() {
        let (handle, inbox) = link::shard_channel();
        let own_handle = handle.clone();
        let deps = deps.clone();
        let counts = Arc::clone(&counts);
        let ready = ready_tx.clone();
        let thread = LocalExecutorBuilder::new(Placement::Fixed(id % cpus))
            .name(&format!("shard-{id}"))
            .ring_depth(deps.config.io_uring_depth)
            .preempt_timer(PREEMPT_TIMER)
            .blocking_thread_pool_placement(PoolPlacement::Unbound(deps.config.callback_threads))
            .spawn(move || async move {
                // Each descriptor is a listening socket whose ownership was given
                // to this shard alone above.
                let listeners = fds
                    .into_iter()
                    .map(|(fd, entry)| (crate::sys::glommio_listener(fd), entry))
                    .collect();
                let _ = ready.send(());
                let shard = Rc::new(Shard::new(id, deps, counts));
                run(shard, listeners, inbox, own_handle).await;
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
        match ready_rx.recv_timeout(SHARD_START_LIMIT) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(StartError::Executor {
                    shard: 0,
                    reason: "a shard thread ended during start-up".into(),
                });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(StartError::Executor {
                    shard: 0,
                    reason: format!("a shard did not start within {SHARD_START_LIMIT:?}"),
                });
            }
        }
    }
    // Every shard's rings and threads exist now: what is open besides client sockets
    // stays about this (a few more for RPC, admin and callbacks: the reserve's part).
    if let Some(open) = crate::sys::open_descriptors() {
        counts.set_open_descriptors(open);
    }
    Ok(Shards { handles, threads })
}

async fn run(
    shard: Rc<Shard>,
    listeners: Vec<(TcpListener, Entry)>,
    inbox: link::Inbox,
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
    let mut reserve_backoff = Duration::from_millis(1);
    loop {
        if shard.counts.descriptors_reserved() {
            // Clients wait in the listen queue while the reserve keeps push RPC and admin
            // accepting; client sockets close on every shard, so look again on a timer.
            shard
                .accept_fd_reserve
                .set(shard.accept_fd_reserve.get() + 1);
            if reserve_backoff == Duration::from_millis(1) {
                tracing::warn!(
                    shard = shard.id,
                    fd_reserve = shard.config.fd_reserve,
                    "descriptors within fd_reserve of the open-files limit; not accepting clients"
                );
            }
            Timer::new(reserve_backoff).await;
            reserve_backoff = (reserve_backoff * 2).min(MAX_ACCEPT_BACKOFF);
            continue;
        }
        reserve_backoff = Duration::from_millis(1);
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
                let peer = stream.peer_addr().ok().map(|addr| addr.ip());
                // Over its source's limit: closed unread (dropping the stream).
                if let Ok(slot) = handshake_slot(&shard, peer) {
                    let live = shard.connection_started();
                    crate::transport::spawn(live, stream, &entry, slot);
                }
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
    fn new(id: usize, deps: ShardDeps, counts: Arc<ClientCounts>) -> Shard {
        let config = deps.config;
        let handshakes_by_source = HandshakesBySource::new(config.handshake_per_source_limit);
        Shard {
            handshakes_by_source,
            resp_authenticated: Rc::default(),
            id,
            config: Arc::clone(&config),
            control: deps.control,
            presence: deps.presence,
            callbacks: deps.callbacks,
            refuse_new_clients: deps.refuse_new_clients,
            verifier: deps.verifier,
            table: RefCell::new(SessionTable::with_recovery(
                recovery::limits(&config),
                recovery::epoch(),
            )),
            counts,
            scratch: RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice()),
            replies: RefCell::new(Vec::new()),
            draining: Cell::new(false),
            live_connections: Cell::new(0),
            pings: Pings {
                websocket: EncodedFrame::ping().bytes().into(),
                json: Arc::from(json::PING_LINE),
                sse: Arc::from(crate::codec::sse::KEEPALIVE),
            },
            accepted: Cell::new(0),
            accept_fd_exhausted: Cell::new(0),
            accept_fd_reserve: Cell::new(0),
            upgraded: Cell::new(0),
            handshake_refusals: RefCell::new(BTreeMap::new()),
            connection_panics: Cell::new(0),
        }
    }

    fn connection_started(self: &Rc<Self>) -> LiveConnection {
        self.live_connections.set(self.live_connections.get() + 1);
        self.counts.socket_opened();
        LiveConnection(Rc::clone(self))
    }

    /// The shard-wide read buffer. Borrow it only within one poll, never across an await.
    pub(crate) fn scratch(&self) -> std::cell::RefMut<'_, Box<[u8]>> {
        self.scratch.borrow_mut()
    }

    /// The shard-wide buffer one read's answers are gathered in (`transport::Inbound`).
    /// Borrow it only within one poll, never across an await.
    pub(crate) fn replies(&self) -> std::cell::RefMut<'_, Vec<u8>> {
        self.replies.borrow_mut()
    }

    /// Whether the shard is shutting down (a client registered now is closed at once).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Whether the node is past a hard load threshold (new handshakes get 503): a sampled
    /// one (the control thread's flag), or the connection bound, which
    /// `admission::claim_verified` then checks exactly.
    pub(crate) fn is_saturated(&self) -> bool {
        self.refuse_new_clients.load(Ordering::Relaxed)
            || !self.counts.has_room(self.config.overload.hard_connections)
    }

    /// Counts a refused handshake under its reason.
    pub(crate) fn handshake_refused(&self, reason: &'static str) {
        *self
            .handshake_refusals
            .borrow_mut()
            .entry(reason)
            .or_default() += 1;
    }

    /// A connection's task panicked and was dropped (`panics`): counts it, and ends the
    /// session it held, if any, as the task would have (its `offline`, its conn_id).
    pub(crate) fn connection_panicked(&self) {
        self.connection_panics.set(self.connection_panics.get() + 1);
        self.reap_orphans();
    }

    /// Unregisters sessions whose connection task is gone. Every registered session is
    /// held by its task until the task unregisters it, so one held by the table alone
    /// lost its task to a panic.
    fn reap_orphans(&self) {
        let orphans = self.table.borrow().orphans();
        for session in orphans {
            self.unregister(&session, &CloseReason::InternalError);
        }
    }

    /// Puts an upgraded client in the table and reports it online.
    /// A recovering session with `since` gets its first frame and what it missed here.
    pub(crate) fn register(&self, session: &Rc<Session>, since: Option<&crate::recovery::Since>) {
        self.table.borrow_mut().insert(session, since);
        self.upgraded.set(self.upgraded.get() + 1);
        if self.is_draining() {
            // Accepted before the shard stopped accepting; its handshake ended after.
            // Unannounced: after a hand-over the successor holds back only the conn_ids
            // listed when it took over, so an `online` from here could follow its own
            // (a client closed by the drain that reconnected to this process).
            session.request_close(CloseReason::Shutdown);
            return;
        }
        session.mark_announced();
        self.presence
            .report(PresenceKind::Online, &session.conn_id, &session.info);
        tracing::debug!(shard = self.id, conn_id = ?session.conn_id, "client online");
        crate::fault::panic_if_named("REGISTER", &session.conn_id);
        crate::fault::stall_if_named("REGISTER", &session.conn_id);
    }

    /// Whether this shard keeps a parked recovery buffer for `conn_id` (a client admitted
    /// but never registered gives its conn_id back as parked then, so that pushes go on
    /// reaching the buffer).
    pub(crate) fn keeps_recovery_buffer(&self, conn_id: &str) -> bool {
        self.table.borrow().keeps_parked(conn_id, Instant::now())
    }

    /// Takes an ended session out of the table, reports it offline and frees its conn_id.
    /// The `offline` is queued before the release so that a reconnect's `online` follows it.
    pub(crate) fn unregister(&self, session: &Rc<Session>, reason: &CloseReason) {
        let parked = self
            .table
            .borrow_mut()
            .remove(session, reason, Instant::now());
        self.counts.session_ended();
        if session.was_announced() {
            self.presence
                .report(PresenceKind::Offline, &session.conn_id, &session.info);
        }
        self.control.send(DirectoryRequest::Release {
            conn_id: session.conn_id.to_string(),
            shard: self.id,
            parked,
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
                let _ = reply.send(self.table.borrow_mut().broadcast(&message));
            }
            ShardCommand::Kick {
                conn_ids,
                reason,
                reply,
            } => {
                if reason == CloseReason::Kicked {
                    let dropped = self.table.borrow_mut().drop_parked(&conn_ids);
                    for conn_id in dropped {
                        self.control.send(DirectoryRequest::Expired {
                            conn_id,
                            shard: self.id,
                        });
                    }
                }
                let missing = self.table.borrow().kick(conn_ids, &reason);
                if let Some(reply) = reply {
                    let _ = reply.send(missing);
                }
            }
            ShardCommand::GroupJoin {
                group,
                conn_ids,
                reply,
            } => {
                let _ = reply.send(self.table.borrow_mut().join(&group, conn_ids));
            }
            ShardCommand::GroupLeave {
                group,
                conn_ids,
                reply,
            } => {
                let _ = reply.send(self.table.borrow_mut().leave(&group, conn_ids));
            }
            ShardCommand::GroupPush {
                group,
                message,
                reply,
            } => {
                let _ = reply.send(self.table.borrow_mut().group_push(&group, &message));
            }
            ShardCommand::ExpectParcel { conn_id } => {
                self.table
                    .borrow_mut()
                    .expect_parcel(&conn_id, Instant::now());
            }
            ShardCommand::HandOver { conn_id, to, grant } => {
                let parcel = self.table.borrow_mut().hand_over(&conn_id);
                tracing::debug!(shard = self.id, conn_id = ?conn_id, kept = parcel.is_some(), "recovery buffer handed to another shard");
                to.send(ShardCommand::Adopt {
                    conn_id,
                    parcel,
                    grant,
                });
            }
            ShardCommand::Adopt {
                conn_id,
                parcel,
                grant,
            } => {
                self.table
                    .borrow_mut()
                    .adopt(&conn_id, parcel, Instant::now());
                if grant.send(true).is_err() {
                    // The claimant gave up waiting: the buffer stays parked here.
                    self.control.send(DirectoryRequest::Release {
                        conn_id,
                        shard: self.id,
                        parked: true,
                    });
                }
            }
            ShardCommand::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            ShardCommand::Ping { reply } => {
                let _ = reply.send(());
            }
            ShardCommand::SuccessorServing { reply } => {
                self.draining.set(true);
                let _ = reply.send(self.announced_conn_ids());
            }
            ShardCommand::Shutdown | ShardCommand::Drained => {}
        }
    }

    /// The conn_ids of the sessions whose `offline` is still to come.
    fn announced_conn_ids(&self) -> Vec<String> {
        let sessions = self.table.borrow().all();
        sessions
            .iter()
            .filter(|session| session.was_announced())
            .map(|session| session.conn_id.to_string())
            .collect()
    }

    fn push(&self, message: &Arc<Message>, conn_ids: Vec<String>) -> PushOutcome {
        for id in &conn_ids {
            crate::fault::panic_if_named("PUSH", id);
        }
        self.table
            .borrow_mut()
            .push(message, conn_ids, Instant::now())
    }

    fn stats(&self) -> ShardStats {
        let table = self.table.borrow();
        let figures = table.figures();
        let recovery = table.recovery_figures();
        ShardStats {
            shard: self.id,
            connections: figures.connections,
            connections_by_transport: figures.connections_by_transport,
            queued_messages: figures.queued_messages,
            queued_bytes: figures.queued_bytes,
            accepted: self.accepted.get(),
            accept_fd_exhausted: self.accept_fd_exhausted.get(),
            accept_fd_reserve: self.accept_fd_reserve.get(),
            upgraded: self.upgraded.get(),
            handshake_refusals: self.handshake_refusals.borrow().clone(),
            delivery_failures: table.delivery_failures().clone(),
            disconnects: table.disconnects().clone(),
            connection_panics: self.connection_panics.get(),
            recovery_buffers: recovery.rings,
            recovery_messages: recovery.messages,
            recovery_bytes: recovery.bytes,
            resp_authenticated: self.resp_authenticated.total(),
        }
    }

    /// The heartbeat rules applied to every session (`SessionTable::sweep`).
    fn sweep(&self, now: Instant) {
        let heartbeat = Heartbeat {
            ping_interval: self.config.ping_interval,
            timeout: self.config.heartbeat_timeout,
        };
        self.table.borrow().sweep(now, heartbeat, &self.pings);
        let expired = self.table.borrow_mut().sweep_recovery(now);
        for conn_id in expired {
            // The directory stops routing pushes for it here.
            self.control.send(DirectoryRequest::Expired {
                conn_id: conn_id.to_string(),
                shard: self.id,
            });
        }
    }

    /// Closes every session with "going away", spread evenly over `drain_window` so that
    /// clients do not all reconnect at once, and waits for their tasks to finish (bounded).
    async fn drain(&self) {
        self.draining.set(true);
        let sessions: Vec<Rc<Session>> = self.table.borrow().all();
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
