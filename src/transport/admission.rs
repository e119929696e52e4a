//! Admission of a new client, whatever its transport: the node's state (draining,
//! overloaded), the token (signed locally or `checkToken`), the conn_id claim, and the
//! registered session at the end.
//!
//! Runs on a shard and never blocks it: `checkToken` goes to the shard's blocking pool,
//! the claim to the control thread. Each transport turns a [`Refusal`] into its own
//! answer (HTTP status, JSON error line, RESP error).

use std::os::fd::RawFd;
use std::rc::Rc;

use tokio::sync::oneshot;

use crate::callback::CallbackError;
use crate::codec::Wire;
use crate::control::DirectoryRequest;
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

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Token(why) => write!(f, "token refused: {why}"),
            Refusal::MessageServer(why) => write!(f, "cannot verify token now: {why}"),
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

/// Checks the node's load and the token, then claims the conn_id.
///
/// A stopping node is not refused here: a handshake in flight belongs to a connection
/// accepted before the shard stopped accepting, and during a zero-downtime restart
/// refusing it would be the one refused connection; it completes and
/// [`Shard::register`] closes it with "going away" like every other client.
pub async fn admit(shard: &Shard, token: ClientToken) -> Result<Admitted<'_>, Refusal> {
    let token = verify(shard, token).await?;
    claim_verified(shard, token).await
}

/// The first half of [`admit`]: the node's load and the token, without claiming the
/// conn_id. A RESP client authenticates with `AUTH` long before it subscribes (a pooled
/// connection may never), and only a subscribed one holds its conn_id.
pub(crate) async fn verify(shard: &Shard, mut token: ClientToken) -> Result<ClientToken, Refusal> {
    if shard.is_saturated() {
        return Err(Refusal::Saturated);
    }
    if let Some(signed_info) = check_token(shard, &token).await? {
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
        let session = Rc::new(Session::new(SessionSpec {
            conn_id: token.conn_id.into(),
            info: token.info,
            wire,
            message_head,
            direct_fd,
            queue_limit: self.shard.config.outbound_queue_size,
        }));
        self.shard.register(&session);
        session
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.shard.control.send(DirectoryRequest::Release {
                conn_id: token.conn_id,
                shard: self.shard.id,
            });
        }
    }
}

/// Verifies the token: locally when signed tokens are configured (returning the signed
/// `info`, if any), otherwise with `checkToken` on the shard's blocking pool.
async fn check_token(shard: &Shard, token: &ClientToken) -> Result<Option<String>, Refusal> {
    if let Some(verifier) = &shard.verifier {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        return verifier
            .verify(&token.token, &token.conn_id, now)
            .map(|verified| verified.info)
            .map_err(|err| Refusal::Token(err.to_string()));
    }
    let Some(client) = shard.callbacks.clone() else {
        return Ok(None);
    };
    let token = token.clone();
    let verdict = glommio::executor()
        .spawn_blocking(move || client.check_token(&token))
        .await;
    match verdict {
        Ok(()) => Ok(None),
        Err(CallbackError::Refused(why)) => Err(Refusal::Token(why)),
        Err(err) => Err(Refusal::MessageServer(err.to_string())),
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
