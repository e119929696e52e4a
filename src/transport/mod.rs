//! Client transports. Each turns a socket accepted on a shard into a registered
//! [`crate::session::Session`] and runs it until it closes: WebSocket ([`ws`]),
//! Server-Sent Events on the WebSocket port ([`sse`]) and raw TCP speaking JSON-lines or
//! RESP ([`tcp`]), any of them optionally over TLS ([`tls`]).
//!
//! This module owns what every transport shares once a session exists: the session loop
//! (reads, queued writes, close requests) and the closing handshake. It runs on a shard,
//! one task per connection, and never blocks; per idle connection a task holds only the
//! session and its protocol's small decoder, reads going through the shard's scratch
//! buffer.

pub(crate) mod admission;
pub(crate) mod sse;
pub(crate) mod tcp;
pub(crate) mod tls;
pub mod ws;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;

use crate::codec::Wire;
use crate::panics::contain;
use crate::session::{CloseReason, Session};
use crate::shard::{LiveConnection, Shard};
use crate::transport::admission::{HandshakeSlot, until_token_accepted};

/// Reads handled in one poll before the task yields to its neighbours. Two reads of the
/// 16 KiB scratch buffer: a client that sends as fast as it can (say, 16 KiB of RESP
/// PINGs, 2,700 replies) holds the shard for one such read at a time, so that the inbox
/// and the other clients get their turn between; at 8, twenty such clients held a debug
/// build's shard for seconds per round.
const READS_PER_POLL: usize = 2;

/// What a client listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// WebSocket upgrades (`GET /ws?t=...`) and event streams (`GET /sse?t=...`): one
    /// request parser tells them apart by path.
    WebSocket,
    /// Raw TCP: JSON-lines or RESP, as `tcp_protocol` says or the first byte tells.
    Tcp,
}

/// A client listener's role: what it serves and whether TLS wraps it.
#[derive(Clone)]
pub(crate) struct Entry {
    /// The protocol family.
    pub(crate) kind: EntryKind,
    /// TLS, when configured for this listener.
    pub(crate) tls: Option<tls::Acceptor>,
}

/// A client's byte stream: plain TCP or TLS over it.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin {}
impl<S: AsyncRead + AsyncWrite + Unpin> ClientStream for S {}

/// What a transport does with bytes a registered client sends.
pub(crate) trait Inbound {
    /// Handles one read's worth of bytes; `Some(reason)` ends the session. Its answers
    /// (pongs, command replies, error lines) go into `replies`, which the session loop
    /// hands to the client as one write once the read is handled: a 16 KiB read of
    /// empty WebSocket pings is 2,730 pongs, and a `send(2)` each kept a shard busy for
    /// milliseconds per read (four such clients put 60-85 ms on other clients' pushes).
    fn on_bytes(
        &mut self,
        shard: &Shard,
        session: &Session,
        bytes: &[u8],
        replies: &mut Vec<u8>,
    ) -> Option<CloseReason>;
}

/// What the shard's reply buffer keeps between reads: one read's answers are usually a
/// few bytes, but a RESP `SUBSCRIBE` of many channels answers with a line per channel.
const REPLIES_KEPT_BYTES: usize = 64 * 1024;

/// Hands what one read's handling answered to the client, as one item of its queue.
pub(crate) fn answer(session: &Session, replies: &mut Vec<u8>) {
    if !replies.is_empty() {
        session.send_control(&Arc::from(&replies[..]));
        replies.clear();
        replies.shrink_to(REPLIES_KEPT_BYTES);
    }
}

/// Starts serving one accepted connection, on whatever `entry` says, as a task of the
/// current shard that lives as long as the connection. The task holds `slot`, its place
/// among its source's handshakes, until its token is accepted (`admission`).
///
/// Each kind of connection gets a task of its own future type, because a task's size is
/// memory per client: a plain WebSocket client's task is just [`ws::serve`], and the
/// larger states (a TLS session, the raw TCP greetings) cost only the clients that use
/// them.
pub(crate) fn spawn(
    live: LiveConnection,
    stream: TcpStream,
    entry: &Entry,
    slot: Option<HandshakeSlot>,
) {
    // TCP_NODELAY comes from the listener (`app::bind_client_port`).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    if entry.kind == EntryKind::Tcp {
        let config = &live.shard().config;
        tcp::enable_keepalive(fd, config.ping_interval, config.heartbeat_timeout);
    }
    let shard = Rc::clone(live.shard());
    // The panic policy (`panics`): a panic ends this connection only, and the shard then
    // reports its session offline.
    let on_panic = move || shard.connection_panicked();
    let task = match (&entry.tls, entry.kind) {
        (None, EntryKind::WebSocket) => glommio::spawn_local(contain(
            until_token_accepted(ws::serve(live, stream, Some(fd)), slot),
            on_panic,
        )),
        (None, EntryKind::Tcp) => glommio::spawn_local(contain(
            until_token_accepted(tcp::serve(live, stream, Some(fd)), slot),
            on_panic,
        )),
        (Some(acceptor), kind) => glommio::spawn_local(contain(
            until_token_accepted(serve_tls(live, stream, acceptor.clone(), kind), slot),
            on_panic,
        )),
    };
    task.detach();
}

/// The TLS handshake, then the connection's protocol inside TLS (pushes always go through
/// the session's queue: only the connection task can write TLS records).
async fn serve_tls(
    live: LiveConnection,
    stream: TcpStream,
    acceptor: tls::Acceptor,
    kind: EntryKind,
) {
    let shard = Rc::clone(live.shard());
    let peer = stream.peer_addr().ok();
    let accepted = with_deadline(acceptor.accept(stream), shard.config.handshake_timeout).await;
    match accepted {
        Some(Ok(tls)) => match kind {
            EntryKind::WebSocket => ws::serve(live, tls, None).await,
            EntryKind::Tcp => tcp::serve(live, tls, None).await,
        },
        Some(Err(err)) => {
            shard.handshake_refused("tls");
            tracing::info!(shard = shard.id, peer = ?peer, error = %err, "TLS handshake failed");
        }
        None => {
            shard.handshake_refused("timeout");
            tracing::info!(shard = shard.id, peer = ?peer, "TLS handshake not completed in time");
        }
    }
}

/// Runs a registered session until something ends it.
pub(crate) async fn run_session<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    session: &Session,
    inbound: &mut impl Inbound,
) -> CloseReason {
    // The original's `\n`-joined frames are a WebSocket compatibility option: JSON-lines
    // and RESP clients get one message per line / pub/sub reply whatever the setting.
    let coalesce = shard.config.coalesce_messages
        && matches!(session.wire(), Wire::WebSocket | Wire::WebSocketDeflate(_));
    poll_fn(|cx| {
        session.set_waker(cx.waker());
        for _ in 0..READS_PER_POLL {
            if let Some(reason) = session.close_reason() {
                return Poll::Ready(reason);
            }
            if let Poll::Ready(Err(_)) = flush(cx, stream, session, coalesce) {
                return Poll::Ready(CloseReason::ClientGone);
            }
            if session.is_over_budget() {
                // The client is not taking what we owe it: reading on would only queue
                // more replies (a client that sends pings as fast as it can and never
                // reads grew the node by 295 MB in 10 s). The flush above waits for the
                // socket to drain; the heartbeat sweep ends a client that stays over.
                return Poll::Pending;
            }
            match read_once(cx, shard, stream, session, inbound) {
                Poll::Ready(None) => continue,
                Poll::Ready(Some(reason)) => return Poll::Ready(reason),
                Poll::Pending => {
                    return match session.close_reason() {
                        Some(reason) => Poll::Ready(reason),
                        None => Poll::Pending,
                    };
                }
            }
        }
        // A client that keeps the socket full gets no more than its share of the shard.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Writes queued items until the queue is empty or the socket is full, then flushes the
/// stream (TLS buffers records until told to).
fn flush<S: ClientStream>(
    cx: &mut Context<'_>,
    stream: &mut S,
    session: &Session,
    coalesce: bool,
) -> Poll<io::Result<()>> {
    if !session.has_backlog() {
        return Poll::Ready(Ok(()));
    }
    let written = session.with_backlog(coalesce, |backlog| {
        while let Some(bytes) = backlog.next_bytes() {
            match Pin::new(&mut *stream).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => backlog.advance(n),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    });
    match written {
        Poll::Ready(Ok(())) => Pin::new(&mut *stream).poll_flush(cx),
        other => other,
    }
}

/// One read through the shard's scratch buffer, handed to the protocol. `Ready(None)`:
/// read something, go on; `Ready(Some(reason))`: the session ends.
fn read_once<S: ClientStream>(
    cx: &mut Context<'_>,
    shard: &Shard,
    stream: &mut S,
    session: &Session,
    inbound: &mut impl Inbound,
) -> Poll<Option<CloseReason>> {
    let mut scratch = shard.scratch();
    let n = match Pin::new(&mut *stream).poll_read(cx, &mut scratch[..]) {
        Poll::Pending => return Poll::Pending,
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
            return Poll::Ready(Some(CloseReason::ClientGone));
        }
        Poll::Ready(Ok(n)) => n,
    };
    session.touch(Instant::now());
    let mut replies = shard.replies();
    let ended = inbound.on_bytes(shard, session, &scratch[..n], &mut replies);
    answer(session, &mut replies);
    Poll::Ready(ended)
}

/// The closing handshake: flush (when the reason allows), the protocol's farewell,
/// half-close, then let the client read it all before the socket goes (closing with
/// unread input would reset the connection and lose the farewell).
pub(crate) async fn close<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    session: &Session,
    reason: CloseReason,
) {
    let config = &shard.config;
    match reason {
        CloseReason::ClientGone => {}
        CloseReason::SlowConsumer | CloseReason::HeartbeatTimeout => {
            // The client is not reading: nothing queued will get through; try the
            // farewell once without waiting, unless a message is partly on the wire (the
            // farewell cannot go in the middle of it, and waiting for a client that does
            // not read is what this close ends).
            let mid_message = session.discard_queue();
            // Only a plain socket can be tried without waiting.
            if let (false, Some(fd), Some(farewell)) = (
                mid_message,
                session.direct_fd(),
                reason.farewell(session.wire()),
            ) {
                let _ = crate::sys::send_now(fd, &farewell);
            }
        }
        _ => {
            if !reason.flushes_queue() {
                // A message partly written is kept, so the farewell follows it whole.
                session.discard_queue();
            }
            if let Some(farewell) = reason.farewell(session.wire()) {
                session.queue_control(farewell);
            }
            let flushed = poll_fn(|cx| flush(cx, stream, session, false));
            if let Some(Ok(())) = with_deadline(flushed, config.close_timeout).await {
                let _ = with_deadline(stream.close(), config.close_timeout).await;
                let _ = with_deadline(read_to_eof(stream), config.close_timeout).await;
            }
        }
    }
}

async fn read_to_eof<S: ClientStream>(stream: &mut S) {
    let mut sink = [0u8; 256];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// Writes `bytes` and flushes, within `limit`; false if the client is gone or stuck.
pub(crate) async fn write_reply<S: ClientStream>(
    stream: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> bool {
    let written = with_deadline(
        async {
            stream.write_all(bytes).await?;
            stream.flush().await
        },
        limit,
    )
    .await;
    matches!(written, Some(Ok(())))
}

/// Runs `future` for at most `limit`; `None` if it did not finish.
pub(crate) async fn with_deadline<T>(
    future: impl Future<Output = T>,
    limit: Duration,
) -> Option<T> {
    futures_lite::future::or(async { Some(future.await) }, async {
        Timer::new(limit).await;
        None
    })
    .await
}
