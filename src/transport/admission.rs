//! Admission of a new client, whatever its transport: the node's state (draining,
//! overloaded), the token (signed locally or `checkToken`), the conn_id claim, and the
//! registered session at the end.
//!
//! Runs on a shard and never blocks it: `checkToken` goes to the shard's blocking pool,
//! the claim to the control thread. Each transport turns a [`Refusal`] into its own
//! answer (HTTP status, JSON error line, RESP error).

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::oneshot;

use crate::callback::CallbackError;
use crate::codec::Wire;
use crate::link::DirectoryRequest;
use crate::session::{Session, SessionSpec};
use crate::shard::Shard;
use crate::transport::with_deadline;
use crate::transport::ws::handshake::ClientToken;

/// Why a client was not admitted.
#[derive(Debug)]
pub enum Refusal {
    /// The token was refused (by `checkToken` or the signature check).
    Token(String),
    /// `checkToken` could not be asked.
    MessageServer(String),
    /// The conn_id is already connected here.
    Duplicate,
    /// The node is past a hard load threshold.
    Saturated,
}

impl Refusal {
    /// The reason as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Token(_) => "token",
            Refusal::MessageServer(_) => "message_server",
            Refusal::Duplicate => "duplicate",
            Refusal::Saturated => "overloaded",
        }
    }

    /// Seconds a client should wait before trying again, for refusals that pass.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Refusal::MessageServer(_) => Some(1),
            Refusal::Saturated => Some(5),
            Refusal::Token(_) | Refusal::Duplicate => None,
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
            Refusal::Token(_) => f.write_str("token refused"),
            Refusal::MessageServer(_) => {
                f.write_str("cannot verify the token now; try again later")
            }
            Refusal::Duplicate => f.write_str("conn_id already connected"),
            Refusal::Saturated => f.write_str("node is overloaded; try another node"),
        }
    }
}

/// A client that passed every check and holds its conn_id: it becomes a session with
/// [`Admitted::register`], or gives the conn_id back when dropped.
pub struct Admitted<'a> {
    shard: &'a Shard,
    token: Option<ClientToken>,
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
    if let Some(signed_info) = check_token(shard, &token, client_fd).await? {
        token.info = signed_info;
    }
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
    claim(shard, &token.conn_id).await?;
    Ok(Admitted {
        shard,
        token: Some(token),
    })
}

impl Admitted<'_> {
    /// The admitted conn_id.
    pub fn conn_id(&self) -> &str {
        self.token.as_ref().map_or("", |t| t.conn_id.as_str())
    }

    /// Replaces the client's `info` (a RESP client may name itself after AUTH).
    pub fn set_info(&mut self, info: String) {
        if let Some(token) = &mut self.token {
            token.info = info;
        }
    }

    /// Registers the session (it is online from here) and returns it.
    pub fn register(
        mut self,
        wire: Wire,
        message_head: Box<[u8]>,
        direct_fd: Option<RawFd>,
    ) -> Rc<Session> {
        let token = self.token.take().expect("registered once");
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
    let mut byte = 0u8;
    // SAFETY: a one-byte read into a local, MSG_PEEK: the socket is left as it was. The
    // descriptor belongs to the connection task awaiting this job, so it is open.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
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
                Refusal::Token(err.to_string())
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
        return Err(Refusal::MessageServer("checkToken queue full".into()));
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
            Err(Refusal::Token(why))
        }
        Verdict::Checked(Err(err)) => {
            tracing::info!(shard = shard.id, conn_id = ?conn_id, url = %log_url, error = %err, "checkToken failed: handshake refused with 503");
            Err(Refusal::MessageServer(err.to_string()))
        }
        Verdict::Skipped => {
            tracing::debug!(shard = shard.id, conn_id = ?conn_id, "client gone before its checkToken started: call skipped");
            Err(Refusal::MessageServer("client gone".into()))
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
        _ => Err(Refusal::Duplicate),
    }
}
