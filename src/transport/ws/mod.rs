//! WebSocket clients: the upgrade (token check, conn_id claim), the session loop (reads,
//! queued writes, close requests) and the closing handshake.
//!
//! Runs on a shard as one task per connection and must never block: `checkToken` goes to
//! the shard's blocking pool, the conn_id claim to the control thread. Per idle
//! connection this task holds only the session and a small frame decoder; reads go
//! through the shard's shared scratch buffer.

pub mod frame;
pub mod handshake;

use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::timer::Timer;
use tokio::sync::oneshot;

use crate::callback::CallbackError;
use crate::control::DirectoryRequest;
use crate::session::{CloseReason, Session};
use crate::shard::{LiveConnection, Shard};
use frame::{Decoder, EncodedFrame, Inbound};
use handshake::{ClientToken, HandshakeError, UpgradeRequest};

/// The only path clients upgrade on (COMPAT.md section 3).
const WS_PATH: &str = "/ws";
/// Reads handled in one poll before the task yields to its neighbours.
const READS_PER_POLL: usize = 8;

/// Serves one accepted connection to its end.
pub async fn serve(live: LiveConnection, mut stream: TcpStream) {
    let shard = Rc::clone(live.shard());
    let _ = stream.set_nodelay(true);
    // Boxed: the handshake's state is freed once it completes, so an idle session's task
    // does not carry it.
    let Some(session) = Box::pin(handshake(&shard, &mut stream)).await else {
        return;
    };
    let reason = run_session(&shard, &mut stream, &session).await;
    shard.unregister(&session, &reason);
    Box::pin(close(&shard, &mut stream, &session, reason)).await;
}

/// Why an upgrade did not happen; each maps to the HTTP answer (if any) the client gets.
#[derive(Debug)]
enum Refusal {
    Request(HandshakeError),
    Token(String),
    MessageServer(String),
    Duplicate,
    Draining,
    Saturated,
    TimedOut,
    Gone,
}

async fn handshake(shard: &Rc<Shard>, stream: &mut TcpStream) -> Option<Rc<Session>> {
    let peer = stream.peer_addr().ok();
    match upgrade(shard, stream).await {
        Ok(session) => Some(session),
        Err(refusal) => {
            shard.handshake_refused(refusal.label());
            let (status, retry) = match &refusal {
                Refusal::Request(err) => (Some(err.status()), None),
                Refusal::Token(_) => (Some("401 Unauthorized"), None),
                Refusal::Duplicate => (Some("400 Bad Request"), None),
                Refusal::MessageServer(_) | Refusal::Draining => {
                    (Some("503 Service Unavailable"), Some(1))
                }
                Refusal::Saturated => (Some("503 Service Unavailable"), Some(5)),
                Refusal::TimedOut | Refusal::Gone => (None, None),
            };
            let reason = refusal_text(&refusal);
            tracing::info!(shard = shard.id, peer = ?peer, reason = %reason, "handshake refused");
            if let Some(status) = status {
                let response = handshake::refusal_response(status, &reason, retry);
                let _ =
                    with_deadline(stream.write_all(&response), shard.config.close_timeout).await;
            }
            None
        }
    }
}

impl Refusal {
    /// The reason as a metric label.
    fn label(&self) -> &'static str {
        match self {
            Refusal::Request(_) => "bad_request",
            Refusal::Token(_) => "token",
            Refusal::MessageServer(_) => "message_server",
            Refusal::Duplicate => "duplicate",
            Refusal::Draining => "draining",
            Refusal::Saturated => "overloaded",
            Refusal::TimedOut => "timeout",
            Refusal::Gone => "gone",
        }
    }
}

fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Request(err) => err.to_string(),
        Refusal::Token(why) => format!("token refused: {why}"),
        Refusal::MessageServer(why) => format!("cannot verify token now: {why}"),
        Refusal::Duplicate => "conn_id already connected".into(),
        Refusal::Draining => "node is shutting down".into(),
        Refusal::Saturated => "node is overloaded; try another node".into(),
        Refusal::TimedOut => "handshake not completed in time".into(),
        Refusal::Gone => "client left during the handshake".into(),
    }
}

async fn upgrade(shard: &Rc<Shard>, stream: &mut TcpStream) -> Result<Rc<Session>, Refusal> {
    let request = with_deadline(read_request(stream), shard.config.handshake_timeout)
        .await
        .ok_or(Refusal::TimedOut)??;
    if shard.is_draining() {
        return Err(Refusal::Draining);
    }
    if shard.is_saturated() {
        return Err(Refusal::Saturated);
    }
    let signed_info = check_token(shard, &request.token).await?;
    claim(shard, &request.token.conn_id).await?;
    let accepted = handshake::accept_response(&request.key);
    let written = with_deadline(stream.write_all(&accepted), shard.config.handshake_timeout).await;
    if !matches!(written, Some(Ok(()))) {
        shard.control.send(DirectoryRequest::Release {
            conn_id: request.token.conn_id,
            shard: shard.id,
        });
        return Err(Refusal::Gone);
    }
    let ClientToken { conn_id, info, .. } = request.token;
    let info = signed_info.unwrap_or(info);
    let session = Rc::new(Session::new(
        conn_id.into(),
        info,
        stream.as_raw_fd(),
        shard.config.outbound_queue_size,
    ));
    shard.register(&session);
    Ok(session)
}

async fn read_request(stream: &mut TcpStream) -> Result<UpgradeRequest, Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| Refusal::Gone)?;
        if n == 0 {
            return Err(Refusal::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = handshake::parse_request(&buf, WS_PATH).map_err(Refusal::Request)? {
            return Ok(request);
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

/// Runs an upgraded session until something ends it.
async fn run_session(shard: &Shard, stream: &mut TcpStream, session: &Session) -> CloseReason {
    let mut decoder = Decoder::default();
    poll_fn(|cx| {
        session.set_waker(cx.waker());
        for _ in 0..READS_PER_POLL {
            if let Some(reason) = session.close_reason() {
                return Poll::Ready(reason);
            }
            if let Poll::Ready(Err(_)) = flush(cx, stream, session, shard.config.coalesce_messages)
            {
                return Poll::Ready(CloseReason::ClientGone);
            }
            match read_frames(cx, shard, stream, session, &mut decoder) {
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

/// Writes queued frames until the queue is empty or the socket is full.
fn flush(
    cx: &mut Context<'_>,
    stream: &mut TcpStream,
    session: &Session,
    coalesce: bool,
) -> Poll<io::Result<()>> {
    if !session.has_backlog() {
        return Poll::Ready(Ok(()));
    }
    session.with_queue(coalesce, |queue| {
        while let Some(front) = queue.front_mut() {
            let bytes = &front.frame.bytes()[front.written..];
            match Pin::new(&mut *stream).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    front.written += n;
                    if front.written == front.frame.bytes().len() {
                        queue.pop_front();
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    })
}

/// One read through the shard's scratch buffer, decoded. `Ready(None)`: read something,
/// go on; `Ready(Some(reason))`: the session ends.
fn read_frames(
    cx: &mut Context<'_>,
    shard: &Shard,
    stream: &mut TcpStream,
    session: &Session,
    decoder: &mut Decoder,
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
    let mut ended = None;
    let decoded = decoder.feed(&scratch[..n], shard.config.max_frame_size, |inbound| {
        match inbound {
            Inbound::Ping(payload) => {
                session.deliver(&Arc::new(EncodedFrame::pong(&payload)));
            }
            Inbound::Pong => {}
            Inbound::Data { payload, fin } => {
                // Not routed anywhere (as in the original): clients talk to the message
                // server over their own API.
                tracing::debug!(conn_id = %session.conn_id, bytes = payload.len(), fin, "client message");
            }
            Inbound::Close(code) => {
                tracing::debug!(conn_id = %session.conn_id, ?code, "client sent close");
                ended.get_or_insert(CloseReason::ClientClosed);
            }
        }
    });
    if let Err(err) = decoded {
        tracing::info!(conn_id = %session.conn_id, error = %err, "closing client for a bad frame");
        return Poll::Ready(Some(CloseReason::Protocol(err)));
    }
    Poll::Ready(ended)
}

/// The closing handshake: flush (when the reason allows), close frame, half-close, then
/// let the client read it all before the socket goes (closing with unread input would
/// reset the connection and lose the close frame).
async fn close(shard: &Shard, stream: &mut TcpStream, session: &Session, reason: CloseReason) {
    let config = &shard.config;
    match reason {
        CloseReason::ClientGone => {}
        CloseReason::SlowConsumer | CloseReason::HeartbeatTimeout => {
            // The client is not reading: nothing queued will get through; try the close
            // frame once without waiting.
            session.discard_queue();
            if let Some(frame) = reason.close_frame() {
                let _ = crate::sys::send_now(stream.as_raw_fd(), frame.bytes());
            }
        }
        _ => {
            if !reason.flushes_queue() {
                session.discard_queue();
            }
            if let Some(frame) = reason.close_frame() {
                session.with_queue(false, |queue| {
                    queue.push_back(crate::session::Outgoing {
                        frame: Arc::new(frame),
                        written: 0,
                    })
                });
            }
            let flushed = poll_fn(|cx| flush(cx, stream, session, false));
            if let Some(Ok(())) = with_deadline(flushed, config.close_timeout).await {
                crate::sys::shutdown_write(stream.as_raw_fd());
                let _ = with_deadline(read_to_eof(stream), config.close_timeout).await;
            }
        }
    }
}

async fn read_to_eof(stream: &mut TcpStream) {
    let mut sink = [0u8; 256];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// Runs `future` for at most `limit`; `None` if it did not finish.
async fn with_deadline<T>(future: impl Future<Output = T>, limit: Duration) -> Option<T> {
    futures_lite::future::or(async { Some(future.await) }, async {
        Timer::new(limit).await;
        None
    })
    .await
}
