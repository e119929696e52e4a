//! WebSocket clients: the upgrade (request, origin and path checks, admission,
//! permessage-deflate) and the frames of an upgraded session (pings, pongs, close, size
//! limit, inflation). A request on `sse_path` is handed to `transport/sse` once read.
//!
//! Runs on a shard as one task per connection and must never block. The session loop and
//! the closing handshake are the transport module's; this module only speaks HTTP and
//! RFC 6455.

pub mod deflate;
pub mod handshake;

use std::future::Future;
use std::os::fd::RawFd;
use std::rc::Rc;

use futures_lite::AsyncReadExt;

use crate::codec::Wire;
use crate::codec::frame::{Decoder, EncodedFrame, FrameError, Inbound as Frame, Rules};
use crate::session::{CloseReason, Session};
use crate::shard::{LiveConnection, Shard};
use crate::transport::admission::{self, Refusal};
use crate::transport::{ClientStream, Inbound, sse, with_deadline, write_reply};
use deflate::Negotiation;
use handshake::{HandshakeError, Request};

/// Serves one connection: upgrade, session, close. Owns the connection's `live` token:
/// for a plain socket this future is the connection's whole task, so its size is memory
/// per client. (A plain `fn` returning an `async move` block: an `async fn` would keep a
/// second copy of its arguments, the stream included, in every state.)
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve<S: ClientStream>(
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
        let reason = match session.wire() {
            Wire::Sse => super::run_session(shard, &mut stream, &session, &mut sse::Quiet).await,
            _ => {
                let mut frames = Frames::default();
                super::run_session(shard, &mut stream, &session, &mut frames).await
            }
        };
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
        Refusal::Token => "401 Unauthorized",
        Refusal::Duplicate | Refusal::ClientClosed => "400 Bad Request",
        Refusal::MessageServer
        | Refusal::Saturated
        | Refusal::ClaimTimedOut
        | Refusal::PresenceBacklog => "503 Service Unavailable",
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
    let request = match request {
        Request::Upgrade(upgrade) => upgrade,
        Request::EventStream(stream_request) => {
            return sse::accept(shard, stream, stream_request, direct_fd)
                .await
                .map_err(|err| match err {
                    sse::Failure::Refused(refusal) => Failure::Refused(refusal),
                    sse::Failure::Gone => Failure::Gone,
                });
        }
    };
    let wire = match (&request.deflate, shard.config.websocket_compression) {
        (Negotiation::Accepted, Some(settings)) => Wire::WebSocketDeflate(settings),
        (Negotiation::Declined(why), Some(_)) => {
            // Declined, not refused: the connection goes on uncompressed.
            tracing::debug!(shard = shard.id, conn_id = ?request.token.conn_id, reason = %why, "permessage-deflate offer declined");
            Wire::WebSocket
        }
        _ => Wire::WebSocket,
    };
    let admitted = admission::admit_watching(shard, request.token, direct_fd)
        .await
        .map_err(Failure::Refused)?;
    let deflate = matches!(wire, Wire::WebSocketDeflate(_));
    let accepted = handshake::accept_response(&request.key, deflate);
    if !write_reply(stream, &accepted, shard.config.handshake_timeout).await {
        return Err(Failure::Gone);
    }
    Ok(admitted.register(wire, Box::default(), direct_fd))
}

async fn read_request<S: ClientStream>(shard: &Shard, stream: &mut S) -> Result<Request, Failure> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| Failure::Gone)?;
        if n == 0 {
            return Err(Failure::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        // Parsed again only once a line has ended (or at the bound): httparse starts over
        // on each call, and a head trickled in a byte at a time was one parse of all of
        // it per byte (32 MB scanned for 8 KiB, on the shard).
        if !chunk[..n].contains(&b'\n') && buf.len() < handshake::MAX_REQUEST_BYTES {
            continue;
        }
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
    /// The frames so far of a fragmented compressed message (bounded by `max_frame_size`
    /// like any message): it inflates once complete. Boxed, so that a session holds one
    /// word for it when no such message is in flight (a bare `Vec` would be three, in
    /// every WebSocket client's task).
    #[allow(clippy::box_collection)]
    compressed: Option<Box<Vec<u8>>>,
}

/// One frame of a compressed message: kept in `pending` until the last frame, then the
/// whole message is inflated (and checked).
#[allow(clippy::box_collection)]
fn on_compressed(
    pending: &mut Option<Box<Vec<u8>>>,
    payload: Vec<u8>,
    fin: bool,
    text: bool,
    limit: usize,
) -> Result<(), FrameError> {
    if !fin {
        pending.get_or_insert_default().extend_from_slice(&payload);
        return Ok(());
    }
    match pending.take() {
        None => deflate::inflate_checked(&payload, limit, text),
        Some(mut message) => {
            message.extend_from_slice(&payload);
            deflate::inflate_checked(&message, limit, text)
        }
    }
}

impl Inbound for Frames {
    fn on_bytes(
        &mut self,
        shard: &Shard,
        session: &Session,
        bytes: &[u8],
        replies: &mut Vec<u8>,
    ) -> Option<CloseReason> {
        let mut ended = None;
        let mut failed = None;
        let limit = shard.config.max_frame_size;
        let rules = Rules {
            max_message: limit,
            deflate: matches!(session.wire(), Wire::WebSocketDeflate(_)),
        };
        let compressed_frames = &mut self.compressed;
        let decoded = self.decoder.feed(bytes, rules, |inbound| {
            match inbound {
                Frame::Ping(payload) => {
                    replies.extend_from_slice(EncodedFrame::pong(&payload).bytes());
                }
                Frame::Pong => {}
                Frame::Data {
                    payload,
                    fin,
                    text,
                    compressed,
                } => {
                    // Not routed anywhere (as in the original): clients talk to the message
                    // server over their own API.
                    tracing::debug!(conn_id = ?session.conn_id, bytes = payload.len(), fin, text, compressed, "client message");
                    if compressed
                        && failed.is_none()
                        && let Err(err) =
                            on_compressed(compressed_frames, payload, fin, text, limit)
                    {
                        failed = Some(err);
                    }
                }
                Frame::Close(code) => {
                    tracing::debug!(conn_id = ?session.conn_id, ?code, "client sent close");
                    ended.get_or_insert(CloseReason::ClientClosed);
                }
            }
        });
        if let Err(err) = decoded.and(failed.map_or(Ok(()), Err)) {
            tracing::info!(conn_id = ?session.conn_id, error = %err, "closing client for a bad frame");
            return Some(CloseReason::bad_frame(&err));
        }
        ended
    }
}
