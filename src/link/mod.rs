//! The messages that cross threads, and the channels that carry them: what the control
//! thread asks of a shard (`ShardCommand`, through a shard's [`ShardHandle`]) and what a
//! shard answers, and what a shard asks of the directory (`DirectoryRequest`, through its
//! [`ControlLink`]).
//!
//! The one module both sides import, so that `shard` never names `control` and `control`
//! reaches the shards only through here. Holds no state and does no I/O beyond the
//! channels' own wake-ups.

mod inbox;

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::codec::Message;
use crate::session::CloseReason;

pub(crate) use inbox::{Inbox, ShardHandle, channel as shard_channel};

/// Work the control thread hands to a shard.
pub(crate) enum ShardCommand {
    /// Deliver one message to these conn_ids; reply with the ones not delivered and those
    /// kept in a recovery buffer for a client away.
    Push {
        message: Arc<Message>,
        conn_ids: Vec<String>,
        reply: oneshot::Sender<PushOutcome>,
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
    /// A client is reclaiming a conn_id whose recovery buffer is parked on another shard:
    /// keep what is pushed to it from now on until the buffer arrives.
    ExpectParcel { conn_id: String },
    /// Send the parked recovery buffer of `conn_id` (if still kept) to `to`, with the
    /// claimant's `grant`.
    HandOver {
        conn_id: String,
        to: ShardHandle,
        grant: oneshot::Sender<bool>,
    },
    /// Take a recovery buffer from another shard, then grant the claim.
    Adopt {
        conn_id: String,
        parcel: Option<crate::recovery::Parcel>,
        grant: oneshot::Sender<bool>,
    },
    /// Report this shard's figures.
    Stats { reply: oneshot::Sender<ShardStats> },
    /// Answer at once: the liveness probe behind `/readyz`.
    Ping { reply: oneshot::Sender<()> },
    /// A successor serves now: a session that registers here from now on is closed at
    /// once and reports no presence. Reply with the conn_ids whose `offline` is still to
    /// come (the sessions that reported `online`), which the successor holds back.
    SuccessorServing { reply: oneshot::Sender<Vec<String>> },
    /// Stop accepting, close every session with 1001 spread over `drain_window`, then
    /// end the executor. Pushes are still served to sessions not yet closed.
    Shutdown,
    /// Sent by the shard to itself when its drain has finished.
    Drained,
}

/// One shard's figures.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct ShardStats {
    /// Shard index.
    pub(crate) shard: usize,
    /// Sessions in the table.
    pub(crate) connections: usize,
    /// Sessions in the table by the framing they speak (`websocket`, `json`, `resp`).
    pub(crate) connections_by_transport: BTreeMap<&'static str, usize>,
    /// Messages waiting in outbound queues.
    pub(crate) queued_messages: usize,
    /// Bytes waiting in outbound queues (pushes and replies).
    pub(crate) queued_bytes: usize,
    /// Connections accepted (handshake or not).
    pub(crate) accepted: u64,
    /// Accepts refused because descriptors ran out.
    pub(crate) accept_fd_exhausted: u64,
    /// Pauses of the acceptor because the process was within `fd_reserve` descriptors of
    /// its open-files limit.
    pub(crate) accept_fd_reserve: u64,
    /// Clients upgraded.
    pub(crate) upgraded: u64,
    /// Handshakes refused, by reason.
    pub(crate) handshake_refusals: BTreeMap<&'static str, u64>,
    /// Deliveries that failed here, by reason (`unknown`, `closed`, `queue_full`).
    pub(crate) delivery_failures: BTreeMap<&'static str, u64>,
    /// Sessions ended, by close reason (`CloseReason::label`).
    pub(crate) disconnects: BTreeMap<&'static str, u64>,
    /// Connection tasks that panicked (each closed that connection only).
    pub(crate) connection_panics: u64,
    /// Recovery buffers held (live and parked conn_ids).
    pub(crate) recovery_buffers: usize,
    /// Messages kept in recovery buffers.
    pub(crate) recovery_messages: usize,
    /// Bytes counted against `recovery_total_bytes` (payloads plus overhead).
    pub(crate) recovery_bytes: usize,
    /// RESP connections past `AUTH`, subscribed or not.
    pub(crate) resp_authenticated: usize,
}

/// What a push by conn_id did on one shard.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PushOutcome {
    /// Ids it did not reach and will not (not here, closing, slow consumers).
    pub(crate) failed: Vec<String>,
    /// Ids whose client is away: the message waits in its recovery buffer.
    pub(crate) buffered: Vec<String>,
}

/// What a broadcast (or a group push) did on one shard.
#[derive(Debug, Default, Clone)]
pub(crate) struct BroadcastOutcome {
    /// Sessions that accepted the message.
    pub(crate) delivered: usize,
    /// Sessions that did not (closing or slow consumers).
    pub(crate) failed: Vec<String>,
}

impl BroadcastOutcome {
    /// Sums the outcomes of several shards.
    pub(crate) fn merge(outcomes: impl IntoIterator<Item = BroadcastOutcome>) -> BroadcastOutcome {
        let mut total = BroadcastOutcome::default();
        for outcome in outcomes {
            total.delivered += outcome.delivered;
            total.failed.extend(outcome.failed);
        }
        total
    }
}

/// What shards ask of the directory.
pub(crate) enum DirectoryRequest {
    /// Claim a conn_id before upgrading a client; the reply says whether it is granted.
    Claim {
        conn_id: String,
        shard: usize,
        reply: oneshot::Sender<bool>,
    },
    /// The client holding this conn_id on this shard is gone (`parked`: the shard keeps
    /// its recovery buffer, so pushes still go there).
    Release {
        conn_id: String,
        shard: usize,
        parked: bool,
    },
    /// The parked recovery buffer of this conn_id on this shard expired.
    Expired { conn_id: String, shard: usize },
}

/// A shard's non-blocking line to the control thread.
#[derive(Clone)]
pub(crate) struct ControlLink(mpsc::UnboundedSender<DirectoryRequest>);

impl ControlLink {
    /// Sends without waiting. A send after the control thread ended is dropped: by then
    /// the process is exiting and nobody reads the directory.
    pub(crate) fn send(&self, request: DirectoryRequest) {
        let _ = self.0.send(request);
    }
}

/// The receiving end of every [`ControlLink`].
pub(crate) type DirectoryRequests = mpsc::UnboundedReceiver<DirectoryRequest>;

/// A connected link and receiver.
pub(crate) fn directory_channel() -> (ControlLink, DirectoryRequests) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ControlLink(tx), rx)
}
