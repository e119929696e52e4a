//! WebSocket clients: the upgrade (request, origin and path checks, admission) and the
//! frames of an upgraded session (pings, pongs, close, size limit).
//!
//! Runs on a shard as one task per connection and must never block. The session loop and
//! the closing handshake are the transport module's; this module only speaks HTTP and
//! RFC 6455.

pub mod frame;
pub mod handshake;
pub mod utf8;

use std::future::Future;
use std::os::fd::RawFd;
use std::rc::Rc;

use futures_lite::AsyncReadExt;

use crate::codec::Wire;
use crate::session::{CloseReason, Session};
use crate::shard::{LiveConnection, Shard};
use crate::transport::admission::{self, Refusal};
use crate::transport::{ClientStream, Inbound, with_deadline, write_reply};
use frame::{Decoder, EncodedFrame, Inbound as Frame};
use handshake::{HandshakeError, UpgradeRequest};

/// Serves one connection: upgrade, session, close. Owns the connection's `live` token:
/// for a plain socket this future is the connection's whole task, so its size is memory
/// per client. (A plain `fn` returning an `async move` block: an `async fn` would keep a
/// second copy of its arguments, the stream included, in every state.)
#[allow(clippy::manual_async_fn)]
pub fn serve<S: ClientStream>(
    live: LiveConnection,
    mut stream: S,
    direct_fd: Option<RawFd>,
) -> impl Future<Output = ()> {
    async move {
        let shard = live.shard();
        // Boxed: the handshake's state is freed once it completes, so an idle session's
        // task does not carry it.
        let Some(session) = Box::pin(handshake(shard, &mut stream, direct_fd)).await else {
            return;
        };
        let mut frames = Frames::default();
        let reason = super::run_session(shard, &mut stream, &session, &mut frames).await;
        shard.unregister(&session, &reason);
        Box::pin(super::close(shard, &mut stream, &session, reason)).await;
    }
}

/// Why an upgrade did not happen; each maps to the HTTP answer (if any) the client gets.
#[derive(Debug)]
enum Failure {
    Request(HandshakeError),
    Refused(Refusal),
    TimedOut,
    Gone,
}

async fn handshake<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    direct_fd: Option<RawFd>,
) -> Option<Rc<Session>> {
    match upgrade(shard, stream, direct_fd).await {
        Ok(session) => Some(session),
        Err(failure) => {
            shard.handshake_refused(failure.label());
            let (status, headers, retry) = match &failure {
                Failure::Request(err) => (Some(err.status()), err.headers(), None),
                Failure::Refused(refusal) => {
                    (Some(refusal_status(refusal)), "", refusal.retry_after())
                }
                Failure::TimedOut | Failure::Gone => (None, "", None),
            };
            let reason = failure.to_string();
            tracing::info!(shard = shard.id, reason = %reason, "handshake refused");
            if let Some(status) = status {
                let response = handshake::refusal_response(status, headers, &reason, retry);
                write_reply(stream, &response, shard.config.close_timeout).await;
            }
            None
        }
    }
}

fn refusal_status(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Token(_) => "401 Unauthorized",
        Refusal::Duplicate => "400 Bad Request",
        Refusal::MessageServer(_) | Refusal::Saturated => "503 Service Unavailable",
    }
}

impl Failure {
    /// The reason as a metric label.
    fn label(&self) -> &'static str {
        match self {
            Failure::Request(_) => "bad_request",
            Failure::Refused(refusal) => refusal.label(),
            Failure::TimedOut => "timeout",
            Failure::Gone => "gone",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Request(err) => write!(f, "{err}"),
            Failure::Refused(refusal) => write!(f, "{refusal}"),
            Failure::TimedOut => f.write_str("handshake not completed in time"),
            Failure::Gone => f.write_str("client left during the handshake"),
        }
    }
}

async fn upgrade<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    direct_fd: Option<RawFd>,
) -> Result<Rc<Session>, Failure> {
    let request = with_deadline(read_request(shard, stream), shard.config.handshake_timeout)
        .await
        .ok_or(Failure::TimedOut)??;
    let admitted = admission::admit_watching(shard, request.token, direct_fd)
        .await
        .map_err(Failure::Refused)?;
    let accepted = handshake::accept_response(&request.key);
    if !write_reply(stream, &accepted, shard.config.handshake_timeout).await {
        return Err(Failure::Gone);
    }
    Ok(admitted.register(Wire::WebSocket, Box::default(), direct_fd))
}

async fn read_request<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
) -> Result<UpgradeRequest, Failure> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| Failure::Gone)?;
        if n == 0 {
            return Err(Failure::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = handshake::parse_request(&buf, &shard.config.websocket_policy)
            .map_err(Failure::Request)?
        {
            return Ok(request);
        }
    }
}

/// The frames of an upgraded session.
#[derive(Default)]
struct Frames {
    decoder: Decoder,
}

impl Inbound for Frames {
    fn on_bytes(&mut self, shard: &Shard, session: &Session, bytes: &[u8]) -> Option<CloseReason> {
        let mut ended = None;
        let decoded = self.decoder.feed(bytes, shard.config.max_frame_size, |inbound| {
            match inbound {
                Frame::Ping(payload) => {
                    session.send_control(&EncodedFrame::pong(&payload).bytes().into());
                }
                Frame::Pong => {}
                Frame::Data { payload, fin, text } => {
                    // Not routed anywhere (as in the original): clients talk to the message
                    // server over their own API.
                    tracing::debug!(conn_id = ?session.conn_id, bytes = payload.len(), fin, text, "client message");
                }
                Frame::Close(code) => {
                    tracing::debug!(conn_id = ?session.conn_id, ?code, "client sent close");
                    ended.get_or_insert(CloseReason::ClientClosed);
                }
            }
        });
        if let Err(err) = decoded {
            tracing::info!(conn_id = ?session.conn_id, error = %err, "closing client for a bad frame");
            return Some(CloseReason::bad_frame(&err));
        }
        ended
    }
}
