//! The push RPC front (COMPAT.md section 6): accepts message servers' TCP connections on
//! `rpc_addr` and answers their calls in order, many per connection.
//!
//! Runs on the control thread's runtime. A malformed call gets an error reply and the
//! connection stays usable whenever the framing allows; only an oversized request, a
//! timeout or a socket error closes it. Never touches a shard's state except through
//! [`Node`].
//!
//! Every connection is bounded, because the listener may be reachable by anyone: at most
//! `rpc_max_connections` at once (more are closed at once after accept). Until a call
//! proves the connection knows `comet_rpc_token` (any well-formed call, when none is set)
//! it must make that call within `rpc_first_call_timeout` of its first byte, and it may hold
//! `rpc_preauth_request_size` bytes of unfinished request; beyond that its bytes are
//! drawn from a node-wide `rpc_preauth_pool_size`, so that a legitimate first call larger
//! than the allowance (a 64 KiB push on a fresh connection) still passes while hostile
//! connections together cannot hold more than the pool. After that call a request may be
//! `rpc_max_request_size` and the connection may stay silent for `rpc_idle_timeout`.
//! (Before these bounds, 40 silent connections each holding 16 MB without a newline kept
//! +668 MB resident for good.)

pub mod codec;
pub(crate) mod forward;
pub(crate) mod methods;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::control::{Node, Route};
use codec::{Decoder, RawFrame, Request};

/// Requests at least this large are parsed on tokio's blocking pool, not on the control
/// thread, where the directory answers every handshake's claim: building the value of a
/// 4 MiB call (400,000 recipients) takes ~0.1 s in a release build, and the handshakes
/// waiting behind it would wait that long.
pub(crate) const PARSE_OFF_THREAD_BYTES: usize = 256 * 1024;

/// A request this large may name more than [`methods::PUSH_SLICE`] recipients (3 bytes
/// each at least), and a sliced push lets other tasks run between slices: the calls
/// after it on its connection start only once it is answered, so that two pushes to one
/// client still reach it in the order they were sent.
const BARRIER_BYTES: usize = 3 * methods::PUSH_SLICE;

/// Answered replies held for one connection before they are written, even with more
/// calls of the same read still to answer: an attacker's 64 KiB read of 1,110 pipelined
/// `GetAllConnections` at 2,000 clients grew the node by 391 MiB before the first reply
/// went out (and by 890 MiB for 20 connections that never read).
const REPLY_FLUSH_BYTES: usize = 256 * 1024;

/// Methods whose reply grows with the node (every conn_id, every shard's figures): each
/// is answered before the next call of its connection starts, so that a connection holds
/// at most one such reply besides [`REPLY_FLUSH_BYTES`].
fn answers_with_a_listing(method: &str) -> bool {
    matches!(
        method.strip_prefix("Server.").unwrap_or(method),
        "GetAllConnections" | "CheckConnectionsOnline" | "GetNode" | "Status"
    )
}

/// Replies longer than this are encoded on tokio's blocking pool (escaping a 4.5 MB
/// failure text took 1.3 s of the control thread in a debug build).
const ENCODE_OFF_THREAD_BYTES: usize = 256 * 1024;

/// Read size before the connection is authenticated (it may hold little anyway).
const PREAUTH_READ_CHUNK: usize = 16 * 1024;

/// Read size once it is.
const READ_CHUNK: usize = 64 * 1024;

/// At most one warning about refused connections per this interval (a flood of them must
/// not flood the log too).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The per-connection bounds, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    max_connections: usize,
    preauth_request_bytes: usize,
    preauth_pool_bytes: usize,
    max_request_bytes: usize,
    first_call_timeout: Duration,
    /// `None`: no idle timeout.
    idle_timeout: Option<Duration>,
}

impl Limits {
    pub(crate) fn from_config(config: &Config) -> Limits {
        Limits {
            max_connections: config.rpc_max_connections,
            preauth_request_bytes: config.rpc_preauth_request_size,
            preauth_pool_bytes: config.rpc_preauth_pool_size,
            max_request_bytes: config.rpc_max_request_size,
            first_call_timeout: config.rpc_first_call_timeout,
            idle_timeout: Some(config.rpc_idle_timeout).filter(|t| !t.is_zero()),
        }
    }
}

/// Counts open connections; the count drops when the connection's task ends.
struct Slot(Rc<Cell<usize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Bytes of the node-wide pre-authentication pool one connection holds; given back when
/// it authenticates, needs less, or ends.
struct Drawn {
    pool: Rc<Cell<usize>>,
    bytes: usize,
}

impl Drawn {
    /// Holds exactly `needed` bytes from the pool; false if the pool cannot give them.
    fn hold(&mut self, needed: usize) -> bool {
        if needed > self.bytes {
            let more = needed - self.bytes;
            if self.pool.get() < more {
                return false;
            }
            self.pool.set(self.pool.get() - more);
        } else {
            self.pool.set(self.pool.get() + (self.bytes - needed));
        }
        self.bytes = needed;
        true
    }
}

impl Drop for Drawn {
    fn drop(&mut self) {
        self.pool.set(self.pool.get() + self.bytes);
    }
}

/// The connections that have not sent a byte, oldest first. When every slot is taken,
/// the oldest of them is closed to make room: such a connection is kept for good (a
/// message server dials ahead of its first call), so without this a stranger's silent
/// connections held every slot and shut the message server out (attack session 7).
#[derive(Default)]
struct Silent(RefCell<VecDeque<Weak<Unspoken>>>);

/// A connection's place in [`Silent`] until its first byte.
#[derive(Default)]
struct Unspoken {
    evict: tokio::sync::Notify,
    spoken: Cell<bool>,
}

impl Silent {
    fn join(&self, max_connections: usize) -> Rc<Unspoken> {
        let unspoken = Rc::new(Unspoken::default());
        let mut queue = self.0.borrow_mut();
        // Those that spoke or ended leave lazily; compacted past twice the slots.
        if queue.len() > 2 * max_connections {
            queue.retain(|weak| weak.upgrade().is_some_and(|u| !u.spoken.get()));
        }
        queue.push_back(Rc::downgrade(&unspoken));
        unspoken
    }

    /// Tells the oldest silent connection to close; false if there is none.
    fn evict_oldest(&self) -> bool {
        let mut queue = self.0.borrow_mut();
        while let Some(weak) = queue.pop_front() {
            if let Some(unspoken) = weak.upgrade()
                && !unspoken.spoken.get()
            {
                unspoken.spoken.set(true);
                unspoken.evict.notify_one();
                return true;
            }
        }
        false
    }
}

/// Accepts RPC connections until the runtime stops (or the task is aborted, which closes
/// the listener). `route`: `MayForward` on `rpc_addr`; `HereOnly` on a hand-over's peer
/// listener, whose calls the other process forwarded (`rpc::forward`).
pub(crate) async fn serve(node: Rc<Node>, listener: TcpListener, route: Route) {
    let mut limits = Limits::from_config(&node.config);
    if route == Route::HereOnly {
        // The other process's one connection, opened at the hand-over, stays open: were
        // it closed when idle, reopening it could find every slot held by a local
        // stranger (connections without the token still pass the first-call bounds).
        limits.idle_timeout = None;
    }
    let open = Rc::new(Cell::new(0usize));
    let pool = Rc::new(Cell::new(limits.preauth_pool_bytes));
    let silent = Silent::default();
    let mut refusals = crate::logging::Throttle::default();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Past the bound only while the evicted connection's task ends.
                if open.get() >= limits.max_connections && !silent.evict_oldest() {
                    drop(stream);
                    if let Some(refused) = refusals.note(REFUSAL_LOG_INTERVAL, Instant::now()) {
                        tracing::warn!(
                            refused,
                            last_peer = %peer,
                            limit = limits.max_connections,
                            "rpc connections over rpc_max_connections closed at once (logged at most every 10 s)"
                        );
                    }
                    continue;
                }
                open.set(open.get() + 1);
                let slot = Slot(Rc::clone(&open));
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, "rpc client connected");
                let node = Rc::clone(&node);
                let drawn = Drawn {
                    pool: Rc::clone(&pool),
                    bytes: 0,
                };
                let unspoken = silent.join(limits.max_connections);
                tokio::task::spawn_local(async move {
                    let _slot = slot;
                    serve_connection(node, stream, peer, limits, drawn, route, unspoken).await;
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "rpc accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Why a connection was closed by us.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("no authenticated call within {0:?} of its first byte")]
    NoFirstCall(Duration),
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("replies not read by the client within {0:?}")]
    WriteStalled(Duration),
    #[error("unauthenticated request over its allowance and the pre-auth pool is spent")]
    PreauthPoolSpent,
    #[error("this node has handed over and has no clients left: reconnect to the successor")]
    Moved,
    #[error("silent since it connected, and its slot was needed (rpc_max_connections)")]
    Evicted,
}

/// Returns once the node tells its RPC connections to move; never, if it cannot.
async fn until_moving(moving: &mut tokio::sync::watch::Receiver<bool>) {
    if moving.wait_for(|moving| *moving).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn serve_connection(
    node: Rc<Node>,
    mut stream: TcpStream,
    peer: SocketAddr,
    limits: Limits,
    mut drawn: Drawn,
    route: Route,
    unspoken: Rc<Unspoken>,
) {
    let mut decoder = Decoder::with_limit(limits.max_request_bytes);
    // Counted from the connection's first byte: a message server that dials at start
    // (or at `addCometServer`) and pushes minutes later sends nothing meanwhile, and the
    // original never closed it (Go's `net/rpc` does not redial: a close is ErrShutdown
    // on every later call). A connection that has sent nothing holds a slot of
    // `rpc_max_connections` and its read buffer, no request bytes.
    let mut first_call_deadline = None;
    let mut authenticated = false;
    let mut chunk = vec![0u8; PREAUTH_READ_CHUNK];
    let mut replies = Vec::new();
    let mut calls = VecDeque::new();
    let mut moving = node.rpc_moving();
    let outcome = loop {
        // Idle here: every call read so far is answered. A draining node closes the
        // connection now if told to (`Node::move_rpc_clients`), never with a request half
        // read, so a call the client sent that got no reply was not executed.
        let idle = decoder.buffered() == 0;
        let read = async {
            if !idle {
                return Some(stream.read(&mut chunk).await);
            }
            tokio::select! {
                read = stream.read(&mut chunk) => Some(read),
                () = until_moving(&mut moving) => None,
            }
        };
        let n = if let (false, Some(deadline)) = (authenticated, first_call_deadline) {
            match tokio::time::timeout_at(deadline, read).await {
                Ok(read) => read,
                Err(_) => break Err(Closed::NoFirstCall(limits.first_call_timeout)),
            }
        } else if !authenticated {
            // Not a byte yet: kept until a new connection needs its slot.
            tokio::select! {
                read = read => read,
                () = unspoken.evict.notified() => break Err(Closed::Evicted),
            }
        } else if let Some(idle) = limits.idle_timeout {
            match tokio::time::timeout(idle, read).await {
                Ok(read) => read,
                Err(_) => break Err(Closed::Idle(idle)),
            }
        } else {
            read.await
        };
        let n = match n {
            None => break Err(Closed::Moved),
            Some(Ok(0) | Err(_)) => break Ok(()),
            Some(Ok(n)) => n,
        };
        first_call_deadline.get_or_insert_with(|| {
            unspoken.spoken.set(true);
            tokio::time::Instant::now() + limits.first_call_timeout
        });
        decoder.extend(&chunk[..n]);
        // Every call that arrived together is started at once (a pipelining client gets
        // its pushes batched per shard) and answered in order. Tasks run in spawn order,
        // so two pushes to one client reach its shard in the order they were sent; a
        // large request is parsed off the thread before the next one is looked at, so
        // that order holds for it too.
        let mut write_failed = None;
        let too_large = loop {
            match decoder.next_raw() {
                Ok(Some(raw)) => {
                    let large = raw.len() >= BARRIER_BYTES;
                    // Checked here, not when the call is answered: the next request,
                    // maybe already buffered, is no longer held to the pre-auth bounds.
                    let token = (!authenticated).then(|| node.config.comet_rpc_token.clone());
                    let (request, authenticates) = parse(raw, token).await;
                    // During a restart's drain a later call that needs no forwarding
                    // could overtake an earlier one that does: one at a time then.
                    let barrier = large
                        || node.is_forwarding()
                        || request
                            .as_ref()
                            .is_ok_and(|r| answers_with_a_listing(&r.method));
                    if authenticates {
                        authenticated = true;
                        drawn.hold(0);
                        chunk.resize(READ_CHUNK, 0);
                    }
                    calls.push_back(tokio::task::spawn_local(answer(
                        Rc::clone(&node),
                        request,
                        route,
                    )));
                    if barrier {
                        while let Some(call) = calls.pop_front() {
                            replies.extend(call.await.unwrap_or_default());
                        }
                    }
                    if replies.len() >= REPLY_FLUSH_BYTES {
                        match write(&mut stream, &replies, limits).await {
                            Ok(true) => replies.clear(),
                            Ok(false) => {
                                write_failed = Some(Ok(()));
                                break None;
                            }
                            Err(stalled) => {
                                write_failed = Some(Err(stalled));
                                break None;
                            }
                        }
                    }
                }
                Ok(None) => break None,
                Err(err) => break Some(err),
            }
        };
        // What an unauthenticated connection holds beyond its own allowance comes out of
        // the shared pool (checked after every read, so a read's worth of overshoot).
        let over = decoder
            .buffered()
            .saturating_sub(limits.preauth_request_bytes);
        if let Some(outcome) = write_failed {
            break outcome;
        }
        let preauth_spent = !authenticated && too_large.is_none() && !drawn.hold(over);
        while let Some(call) = calls.pop_front() {
            replies.extend(call.await.unwrap_or_default());
        }
        if let Some(err) = too_large {
            tracing::warn!(%peer, authenticated, error = %err, "rpc connection closed");
            replies.extend(codec::encode_reply(&Value::Null, Err(err.to_string())));
            let _ = write(&mut stream, &replies, limits).await;
            return;
        }
        if preauth_spent {
            let why = Closed::PreauthPoolSpent;
            replies.extend(codec::encode_reply(&Value::Null, Err(why.to_string())));
            let _ = write(&mut stream, &replies, limits).await;
            break Err(why);
        }
        if !replies.is_empty() {
            match write(&mut stream, &replies, limits).await {
                Ok(true) => replies.clear(),
                Ok(false) => break Ok(()),
                Err(stalled) => break Err(stalled),
            }
        }
    };
    if let Err(why) = outcome {
        tracing::info!(%peer, reason = %why, "rpc connection closed");
    }
}

/// Writes the replies; `Ok(false)` if the socket failed. A client that does not read its
/// replies is given as long as an idle one, then dropped (it would hold them forever).
async fn write(stream: &mut TcpStream, replies: &[u8], limits: Limits) -> Result<bool, Closed> {
    let Some(limit) = limits.idle_timeout else {
        return Ok(stream.write_all(replies).await.is_ok());
    };
    match tokio::time::timeout(limit, stream.write_all(replies)).await {
        Ok(written) => Ok(written.is_ok()),
        Err(_) => Err(Closed::WriteStalled(limit)),
    }
}

/// A parsed request, and whether it carries the right token (asked only when `token`,
/// the expected `comet_rpc_token`, is given).
type Parsed = (Result<Request, (Value, String)>, bool);

/// Parses one framed request and checks its token, a large one on the blocking pool
/// (a first-generation call's token is inside a JSON string, parsed once more).
async fn parse(raw: RawFrame, token: Option<String>) -> Parsed {
    let small = raw.len() < PARSE_OFF_THREAD_BYTES;
    let work = move || {
        let request = raw.into_request();
        let authenticates = match (&request, &token) {
            (Ok(request), Some(token)) => methods::authenticates(token, request),
            _ => false,
        };
        (request, authenticates)
    };
    if small {
        return work();
    }
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|_| {
        (
            Err((Value::Null, "request could not be parsed".into())),
            false,
        )
    })
}

/// Whether a result holds a long list (all connections, online checks), looking no deeper
/// than the newest generation's `data`.
fn is_large(value: &Value) -> bool {
    let long = |v: &Value| v.as_array().is_some_and(|a| a.len() >= 10_000);
    long(value)
        || value.get("data").is_some_and(|data| {
            long(data) || data.as_object().is_some_and(|o| o.values().any(long))
        })
}

async fn answer(
    node: Rc<Node>,
    request: Result<Request, (Value, String)>,
    route: Route,
) -> Vec<u8> {
    match request {
        Ok(request) => {
            let result = methods::dispatch(&node, &request.method, request.param, route).await;
            if let Err(error) = &result {
                tracing::debug!(method = ?request.method, error = %crate::codec::frame::truncate_utf8(error, 200), "rpc call failed");
            }
            let large = match &result {
                Err(text) => text.len() >= ENCODE_OFF_THREAD_BYTES,
                Ok(value) => is_large(value),
            };
            if !large {
                return codec::encode_reply(&request.id, result);
            }
            let id = request.id;
            tokio::task::spawn_blocking(move || codec::encode_reply(&id, result))
                .await
                .unwrap_or_default()
        }
        Err((id, why)) => {
            tracing::info!(error = %why, "malformed rpc call");
            codec::encode_reply(&id, Err(why))
        }
    }
}
