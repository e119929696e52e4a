//! Admission of a new client, whatever its transport: the node's state (draining,
//! overloaded, the exact connection bound), the token (signed locally or `checkToken`),
//! the conn_id claim, and the registered session at the end. Also the limits on
//! connections before any of that: handshakes in flight per source address
//! ([`HandshakesBySource`]) and the counts shared by the shards ([`ClientCounts`]).
//!
//! Runs on a shard and never blocks it: `checkToken` goes to the shard's blocking pool,
//! the claim to the control thread. Each transport turns a [`Refusal`] into its own
//! answer (HTTP status, JSON error line, RESP error).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use tokio::sync::oneshot;

use crate::callback::CallbackError;
use crate::codec::Wire;
use crate::link::DirectoryRequest;
use crate::session::{Session, SessionSpec};
use crate::shard::Shard;
use crate::token::ClientToken;
use crate::transport::with_deadline;

/// Why a client was not admitted.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The token was refused (by `checkToken` or the signature check; the reason is
    /// logged where it is found, the client hears only that).
    Token,
    /// `checkToken` could not be asked (logged where it failed).
    MessageServer,
    /// The conn_id is already connected here.
    Duplicate,
    /// The directory did not answer the conn_id's claim within `handshake_timeout`
    /// (a control thread starved of CPU): not a duplicate, so the client may retry.
    ClaimTimedOut,
    /// The node is past a hard load threshold.
    Saturated,
    /// More than `presence_queue_bytes` of `online`/`offline` callbacks wait for the
    /// message server: a new session would only add to them.
    PresenceBacklog,
    /// The client closed its side before its token could be checked (gone, or a
    /// half-close after the request): `checkToken` was not called, and the message
    /// server is not to blame (a stranger half-closing raised its alarm).
    ClientClosed,
}

impl Refusal {
    /// The reason as a metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Refusal::Token => "token",
            Refusal::MessageServer => "message_server",
            Refusal::Duplicate => "duplicate",
            Refusal::ClaimTimedOut => "claim_timeout",
            Refusal::Saturated => "overloaded",
            Refusal::PresenceBacklog => "presence_backlog",
            Refusal::ClientClosed => "gone",
        }
    }

    /// Seconds a client should wait before trying again, for refusals that pass.
    pub(crate) fn retry_after(&self) -> Option<u32> {
        match self {
            Refusal::MessageServer | Refusal::ClaimTimedOut | Refusal::PresenceBacklog => Some(1),
            Refusal::Saturated => Some(5),
            Refusal::Token | Refusal::Duplicate | Refusal::ClientClosed => None,
        }
    }
}

/// What the client is told: fixed texts. The details a refusal carries (the message
/// server's answer, a callback error naming its URL) are logged by [`admit`], never sent
/// to an unauthenticated client: they held the callback URL with its credentials and
/// query key, or the message server's body verbatim.
impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Token => f.write_str("token refused"),
            Refusal::MessageServer => f.write_str("cannot verify the token now; try again later"),
            Refusal::Duplicate => f.write_str("conn_id already connected"),
            Refusal::ClaimTimedOut | Refusal::PresenceBacklog => {
                f.write_str("node is busy; try again")
            }
            Refusal::Saturated => f.write_str("node is overloaded; try another node"),
            Refusal::ClientClosed => f.write_str("connection closed before the token was checked"),
        }
    }
}

/// Warnings about refused sources, at most one per this, per shard (an attacker makes
/// thousands of refusals a second).
const SOURCE_WARNING_EVERY: Duration = Duration::from_secs(10);

/// What a source of connections is, for its limit: an IPv4 address, or an IPv6 /64 (one
/// subscriber's network: a host picks any address in it at will). An IPv4-mapped IPv6
/// address is its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(u32),
    V6(u64),
}

/// As an operator reads it: the IPv4 address, or the IPv6 /64 prefix.
impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Source::V4(v4) => write!(f, "{}", std::net::Ipv4Addr::from(v4)),
            Source::V6(prefix) => {
                let net = std::net::Ipv6Addr::from(u128::from(prefix) << 64);
                write!(f, "{net}/64")
            }
        }
    }
}

impl Source {
    /// The source a peer address belongs to.
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.into()),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// One shard's connections still in their handshake, by source. A connection holds its
/// place ([`HandshakeSlot`]) from its accept until its token is accepted, or until it
/// ends, whatever ends it; a connection over the limit is closed before anything is read.
/// Per shard, like everything a shard owns: the kernel spreads one source's connections
/// over the shards by 4-tuple hash, so each shard sees its share of them.
pub(crate) struct HandshakesBySource {
    limit: usize,
    in_flight: RefCell<AHashMap<Source, u32>>,
    /// Raised by [`verify`] when a token is accepted, read and lowered by the connection
    /// task's [`UntilTokenAccepted`] around each poll: a shard is one thread and polls
    /// one task at a time, so a token accepted during a poll is that task's.
    token_accepted: Cell<bool>,
    last_warning: Cell<Option<Instant>>,
    refused_unreported: Cell<u64>,
}

impl HandshakesBySource {
    /// A table with `limit` handshakes per source (0: no limit, nothing is tracked).
    pub(crate) fn new(limit: usize) -> HandshakesBySource {
        HandshakesBySource {
            limit,
            in_flight: RefCell::new(AHashMap::new()),
            token_accepted: Cell::new(false),
            last_warning: Cell::new(None),
            refused_unreported: Cell::new(0),
        }
    }

    /// Takes a place for a connection from `source`; false when its source is at the
    /// limit.
    fn enter(&self, source: Source) -> bool {
        let mut in_flight = self.in_flight.borrow_mut();
        let count = in_flight.entry(source).or_default();
        if *count as usize >= self.limit {
            if *count == 0 {
                in_flight.remove(&source);
            }
            return false;
        }
        *count += 1;
        true
    }

    fn leave(&self, source: Source) {
        let mut in_flight = self.in_flight.borrow_mut();
        if let Some(count) = in_flight.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&source);
            }
        }
    }

    /// Handshakes in flight from `source`.
    #[cfg(test)]
    fn in_flight(&self, source: Source) -> u32 {
        self.in_flight.borrow().get(&source).copied().unwrap_or(0)
    }

    /// Logs a refusal, at most once per [`SOURCE_WARNING_EVERY`] (with the number
    /// refused since the last line).
    fn warn_refused(&self, shard: usize, source: Source, now: Instant) {
        let refused = self.refused_unreported.get() + 1;
        let due = self
            .last_warning
            .get()
            .is_none_or(|at| now.duration_since(at) >= SOURCE_WARNING_EVERY);
        if !due {
            self.refused_unreported.set(refused);
            return;
        }
        self.last_warning.set(Some(now));
        self.refused_unreported.set(0);
        tracing::warn!(
            shard,
            %source,
            limit = self.limit,
            refused,
            "a source has handshake_per_source_limit handshakes in flight: connections closed (one line per 10 s)"
        );
    }
}

/// A connection's place among its source's handshakes in flight; given back when
/// dropped, so exactly once whatever ends the handshake (success, refusal, timeout, the
/// task dropped after a panic).
pub(crate) struct HandshakeSlot {
    shard: Rc<Shard>,
    source: Source,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.shard.handshakes_by_source.leave(self.source);
    }
}

/// The connection from `peer` was over its source's limit; the caller closes it.
#[derive(Debug)]
pub(crate) struct SourceLimited;

/// A place for a connection just accepted from `peer`: `Ok(None)` when there is no limit
/// (or the peer is unknown), `Err` when its source is at the limit (counted and logged
/// here; the caller closes the socket without reading it).
pub(crate) fn handshake_slot(
    shard: &Rc<Shard>,
    peer: Option<IpAddr>,
) -> Result<Option<HandshakeSlot>, SourceLimited> {
    let by_source = &shard.handshakes_by_source;
    let (Some(ip), true) = (peer, by_source.limit > 0) else {
        return Ok(None);
    };
    let source = Source::of(ip);
    if !by_source.enter(source) {
        shard.handshake_refused("source_limit");
        by_source.warn_refused(shard.id, source, Instant::now());
        return Err(SourceLimited);
    }
    Ok(Some(HandshakeSlot {
        shard: Rc::clone(shard),
        source,
    }))
}

pin_project_lite::pin_project! {
    /// A connection's task holding its [`HandshakeSlot`] until its token is accepted.
    pub(crate) struct UntilTokenAccepted<F> {
        #[pin]
        connection: F,
        slot: Option<HandshakeSlot>,
    }
}

/// Wraps a connection's task so that it gives its slot back once its token is accepted
/// (or when it ends). A transport does not know about the slot: [`verify`] raises the
/// shard's flag, which is this task's during its poll.
pub(crate) fn until_token_accepted<F: Future>(
    connection: F,
    slot: Option<HandshakeSlot>,
) -> UntilTokenAccepted<F> {
    UntilTokenAccepted { connection, slot }
}

impl<F: Future> Future for UntilTokenAccepted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(slot) = this.slot.as_ref() else {
            return this.connection.poll(cx);
        };
        slot.shard.handshakes_by_source.token_accepted.set(false);
        let polled = this.connection.poll(cx);
        if this
            .slot
            .as_ref()
            .is_some_and(|slot| slot.shard.handshakes_by_source.token_accepted.take())
        {
            *this.slot = None;
        }
        polled
    }
}

/// What the shards share, and the only thing they do (each an atomic, touched once per
/// connect and once per close, never on a push): a descriptor limit and a connection
/// bound are the process's, not a shard's.
pub(crate) struct ClientCounts {
    /// Sessions plus handshakes past their token check: what `overload_hard_connections`
    /// bounds, exactly, per handshake.
    admitted: AtomicUsize,
    /// Client sockets open (accepted, not yet closed), on every shard.
    sockets: AtomicUsize,
    /// Descriptors held by everything but client sockets, counted once at start.
    others: AtomicUsize,
    /// Client sockets stop being accepted this close to `nofile` (0: never).
    fd_reserve: usize,
    /// The open-files limit.
    nofile: usize,
}

impl ClientCounts {
    /// Counts for a process that may hold `nofile` descriptors and keeps `fd_reserve`.
    pub(crate) fn new(nofile: usize, fd_reserve: usize) -> ClientCounts {
        ClientCounts {
            admitted: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            others: AtomicUsize::new(0),
            fd_reserve,
            nofile,
        }
    }

    /// Notes the descriptors open now: all of them but the client sockets are the
    /// process's own (listeners, rings, log, etcd), held from here on.
    pub(crate) fn set_open_descriptors(&self, open: usize) {
        let others = open.saturating_sub(self.sockets.load(Ordering::Relaxed));
        self.others.store(others, Ordering::Relaxed);
    }

    /// Whether accepting one more client would eat into the reserve.
    pub(crate) fn descriptors_reserved(&self) -> bool {
        self.fd_reserve > 0
            && self.sockets.load(Ordering::Relaxed)
                + self.others.load(Ordering::Relaxed)
                + self.fd_reserve
                >= self.nofile
    }

    /// A client socket was accepted.
    pub(crate) fn socket_opened(&self) {
        self.sockets.fetch_add(1, Ordering::Relaxed);
    }

    /// A client socket was closed.
    pub(crate) fn socket_closed(&self) {
        self.sockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether a handshake could be admitted now under `bound` (`None`: no bound).
    pub(crate) fn has_room(&self, bound: Option<u64>) -> bool {
        bound.is_none_or(|bound| (self.admitted.load(Ordering::Relaxed) as u64) < bound)
    }

    /// Takes a place under `bound`, exactly: of two shards racing for the last place one
    /// gets it. `None` at the bound.
    fn take_place(&self, bound: Option<u64>) -> Option<Place<'_>> {
        self.admitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                bound
                    .is_none_or(|bound| (n as u64) < bound)
                    .then_some(n + 1)
            })
            .ok()
            .map(|_| Place(self))
    }

    /// A registered session ended: its place is free (see [`Place::pass_to_session`]).
    pub(crate) fn session_ended(&self) {
        self.admitted.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handshake's place under the connection bound, given back when dropped unless it
/// passed to the session.
struct Place<'a>(&'a ClientCounts);

impl Place<'_> {
    /// The registered session holds the place from here; [`Shard::unregister`] gives it
    /// back (once: every registered session is unregistered once).
    fn pass_to_session(self) {
        std::mem::forget(self);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client that passed every check and holds its conn_id: it becomes a session with
/// [`Admitted::register`], or gives the conn_id (and its place under the connection
/// bound) back when dropped.
pub(crate) struct Admitted<'a> {
    shard: &'a Shard,
    token: Option<ClientToken>,
    place: Option<Place<'a>>,
}

/// Checks the node's load and the token, then claims the conn_id. `client_fd`, the
/// client's plain socket, lets a queued `checkToken` be skipped when the client has
/// already closed it.
///
/// A stopping node is not refused here: a handshake in flight belongs to a connection
/// accepted before the shard stopped accepting, and during a zero-downtime restart
/// refusing it would be the one refused connection; it completes and
/// [`Shard::register`] closes it with "going away" like every other client.
pub(crate) async fn admit_watching(
    shard: &Shard,
    token: ClientToken,
    client_fd: Option<RawFd>,
) -> Result<Admitted<'_>, Refusal> {
    let token = verify_watching(shard, token, client_fd).await?;
    claim_verified(shard, token).await
}

/// The first half of [`admit_watching`]: the node's load and the token, without claiming
/// the conn_id. A RESP client authenticates with `AUTH` long before it subscribes (a
/// pooled connection may never), and only a subscribed one holds its conn_id.
pub(crate) async fn verify(shard: &Shard, token: ClientToken) -> Result<ClientToken, Refusal> {
    verify_watching(shard, token, None).await
}

async fn verify_watching(
    shard: &Shard,
    mut token: ClientToken,
    client_fd: Option<RawFd>,
) -> Result<ClientToken, Refusal> {
    if shard.is_saturated() {
        return Err(Refusal::Saturated);
    }
    // A panic still in the handshake (its source's place held) for the tests.
    crate::fault::panic_if_named("VERIFY", &token.conn_id);
    if let Some(signed_info) = check_token(shard, &token, client_fd).await? {
        token.info = signed_info;
    }
    // The client is no stranger now: its connection leaves its source's handshakes.
    shard.handshakes_by_source.token_accepted.set(true);
    Ok(token)
}

/// The second half of [`admit`], for a token [`verify`] accepted.
pub(crate) async fn claim_verified(
    shard: &Shard,
    token: ClientToken,
) -> Result<Admitted<'_>, Refusal> {
    if shard.is_saturated() {
        return Err(Refusal::Saturated);
    }
    if shard.presence.is_backlogged() {
        return Err(Refusal::PresenceBacklog);
    }
    // Per handshake, not per load sample: a burst of 150 against a bound of 200 with 150
    // connected was all admitted while the sample said 150.
    let place = shard
        .counts
        .take_place(shard.config.overload.hard_connections)
        .ok_or(Refusal::Saturated)?;
    claim(shard, &token.conn_id).await?;
    Ok(Admitted {
        shard,
        token: Some(token),
        place: Some(place),
    })
}

impl Admitted<'_> {
    /// The admitted conn_id.
    pub(crate) fn conn_id(&self) -> &str {
        self.token.as_ref().map_or("", |t| t.conn_id.as_str())
    }

    /// Registers the session (it is online from here) and returns it.
    pub(crate) fn register(
        mut self,
        wire: Wire,
        message_head: Box<[u8]>,
        direct_fd: Option<RawFd>,
    ) -> Rc<Session> {
        let token = self.token.take().expect("registered once");
        if let Some(place) = self.place.take() {
            place.pass_to_session();
        }
        // RESP has no room for numbered messages: its clients never recover.
        let recover =
            token.recovery.recover && wire != Wire::Resp && self.shard.config.recovery_window > 0;
        let session = Rc::new(Session::new(SessionSpec {
            conn_id: token.conn_id.into(),
            info: token.info,
            wire,
            message_head,
            direct_fd,
            queue_limit: self.shard.config.outbound_queue_size,
            queue_bytes: self.shard.config.outbound_queue_bytes,
            recover,
        }));
        let since = token.recovery.since.as_ref().filter(|_| recover);
        self.shard.register(&session, since);
        session
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            let parked = self.shard.keeps_recovery_buffer(&token.conn_id);
            self.shard.control.send(DirectoryRequest::Release {
                conn_id: token.conn_id,
                shard: self.shard.id,
                parked,
            });
        }
    }
}

thread_local! {
    /// This shard's `checkToken` jobs queued on or running in its blocking pool (a shard
    /// is one thread). A job lowers it when it ends, on the pool's thread.
    static CHECKS_IN_POOL: Arc<AtomicUsize> = Arc::new(AtomicUsize::new(0));
}

/// Lowers the shard's count of jobs in its pool when a job ends (or is dropped unrun).
struct InPool(Arc<AtomicUsize>);

impl Drop for InPool {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raised when the handshake waiting for a `checkToken` verdict is dropped (its
/// connection task ended): the job, if it has not started, is not run.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A `checkToken` job's outcome.
enum Verdict {
    Checked(Result<(), CallbackError>),
    /// Not run: the client had gone by the time a pool thread took the job.
    Skipped,
}

/// Whether the client has closed (or reset) its end of `fd`. Peeks, so it consumes
/// nothing; a client with unread bytes pending counts as present.
fn peer_gone(fd: RawFd) -> bool {
    let n = crate::sys::peek_byte(fd);
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EAGAIN | libc::EINTR)
        ),
    }
}

/// Verifies the token: locally when signed tokens are configured (returning the signed
/// `info`, if any), otherwise with `checkToken` on the shard's blocking pool.
///
/// The pool's queue is bounded (`callback_queue_size` jobs per shard, queued or
/// running): with a slow message server (1 s per call) 160 handshakes that closed at once
/// used to leave 152 calls queued ahead of a legitimate client, who waited 9.2 s. Over
/// the bound a handshake gets 503 at once; a queued job whose client has gone is dropped
/// when a pool thread takes it, before its HTTP call.
async fn check_token(
    shard: &Shard,
    token: &ClientToken,
    client_fd: Option<RawFd>,
) -> Result<Option<String>, Refusal> {
    if let Some(verifier) = &shard.verifier {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        return verifier
            .verify(&token.token, &token.conn_id, now)
            .map(|verified| verified.info)
            .map_err(|err| {
                tracing::info!(shard = shard.id, conn_id = ?token.conn_id, reason = %err, "signed token refused");
                Refusal::Token
            });
    }
    let Some(client) = shard.callbacks.clone() else {
        return Ok(None);
    };
    let in_pool = CHECKS_IN_POOL.with(Arc::clone);
    if in_pool.load(Ordering::Relaxed) >= shard.config.callback_queue_size {
        tracing::info!(
            shard = shard.id,
            conn_id = ?token.conn_id,
            limit = shard.config.callback_queue_size,
            "checkToken queue full: handshake refused with 503"
        );
        return Err(Refusal::MessageServer);
    }
    in_pool.fetch_add(1, Ordering::Relaxed);
    let job_slot = InPool(in_pool);
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(Arc::clone(&cancelled));
    let job_token = token.clone();
    let log_url = client.log_url().to_owned();
    let verdict = glommio::executor()
        .spawn_blocking(move || {
            let _slot = job_slot;
            if cancelled.load(Ordering::Relaxed) || client_fd.is_some_and(peer_gone) {
                return Verdict::Skipped;
            }
            Verdict::Checked(client.check_token(&job_token))
        })
        .await;
    let conn_id = &token.conn_id;
    match verdict {
        Verdict::Checked(Ok(())) => Ok(None),
        Verdict::Checked(Err(CallbackError::Refused(why))) => {
            tracing::info!(shard = shard.id, conn_id = ?conn_id, answer = %why, "checkToken refused the token");
            Err(Refusal::Token)
        }
        Verdict::Checked(Err(err)) => {
            tracing::info!(shard = shard.id, conn_id = ?conn_id, url = %log_url, error = %err, "checkToken failed: handshake refused with 503");
            Err(Refusal::MessageServer)
        }
        Verdict::Skipped => {
            tracing::debug!(shard = shard.id, conn_id = ?conn_id, "client gone before its checkToken started: call skipped");
            Err(Refusal::ClientClosed)
        }
    }
}

async fn claim(shard: &Shard, conn_id: &str) -> Result<(), Refusal> {
    let (reply, granted) = oneshot::channel();
    shard.control.send(DirectoryRequest::Claim {
        conn_id: conn_id.to_owned(),
        shard: shard.id,
        reply,
    });
    // Under the replace policy the claim waits for the old connection to close; a
    // dropped receiver tells the directory to give the conn_id back.
    match with_deadline(granted, shard.config.handshake_timeout).await {
        Some(Ok(true)) => Ok(()),
        Some(Ok(false)) => Err(Refusal::Duplicate),
        // A loaded CI machine saw "conn_id already connected" for a client's first
        // connection: its claim had waited past the deadline.
        Some(Err(_)) | None => Err(Refusal::ClaimTimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_reads_as_an_address_or_a_prefix() {
        assert_eq!(
            Source::of("127.0.0.2".parse().unwrap()).to_string(),
            "127.0.0.2"
        );
        assert_eq!(
            Source::of("2001:db8:1:2:3:4:5:6".parse().unwrap()).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            Source::of("::ffff:10.0.0.1".parse().unwrap()).to_string(),
            "10.0.0.1"
        );
    }
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv6_sources_are_grouped_by_64_and_mapped_ipv4_is_ipv4() {
        let a: Ipv6Addr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let other: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Source::of(a.into()), Source::of(b.into()));
        assert_ne!(Source::of(a.into()), Source::of(other.into()));
        let v4 = Ipv4Addr::new(127, 0, 0, 2);
        assert_eq!(
            Source::of(v4.to_ipv6_mapped().into()),
            Source::of(v4.into())
        );
        assert_ne!(
            Source::of(v4.into()),
            Source::of(Ipv4Addr::new(127, 0, 0, 3).into())
        );
    }

    #[test]
    fn a_source_at_its_limit_is_refused_until_one_leaves() {
        let table = HandshakesBySource::new(2);
        let source = Source::V4(1);
        assert!(table.enter(source) && table.enter(source));
        assert!(!table.enter(source), "third in flight");
        assert!(table.enter(Source::V4(2)), "other sources are not affected");
        table.leave(source);
        assert!(table.enter(source));
        table.leave(source);
        table.leave(source);
        assert_eq!(table.in_flight(source), 0);
        assert!(
            table.in_flight.borrow().get(&source).is_none(),
            "no entry kept"
        );
    }

    #[test]
    fn the_connection_bound_is_exact_and_places_come_back() {
        let counts = ClientCounts::new(1000, 0);
        let bound = Some(2);
        let first = counts.take_place(bound).unwrap();
        let second = counts.take_place(bound).unwrap();
        assert!(counts.take_place(bound).is_none());
        assert!(!counts.has_room(bound));
        drop(first);
        assert!(counts.has_room(bound));
        second.pass_to_session();
        let third = counts.take_place(bound).unwrap();
        assert!(
            counts.take_place(bound).is_none(),
            "the session keeps its place"
        );
        counts.session_ended();
        assert!(counts.take_place(bound).is_some());
        drop(third);
        assert!(counts.take_place(None).is_some(), "no bound");
    }

    #[test]
    fn the_descriptor_reserve_counts_sockets_and_the_rest() {
        let counts = ClientCounts::new(100, 10);
        counts.set_open_descriptors(30);
        for _ in 0..59 {
            counts.socket_opened();
        }
        assert!(!counts.descriptors_reserved(), "89 of 100 with 10 kept");
        counts.socket_opened();
        assert!(counts.descriptors_reserved());
        counts.socket_closed();
        assert!(!counts.descriptors_reserved());
        assert!(!ClientCounts::new(1, 0).descriptors_reserved(), "0 = none");
    }
}
