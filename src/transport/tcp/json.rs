//! JSON-lines over TCP: the token line, the `ok`/`error` answer, then one JSON object
//! per line either way (see `codec::json` and docs/PROTOCOL.md).
//!
//! Heartbeat as WebSocket's: the server sends `{"type":"ping"}` after `ping_interval` of
//! silence and closes a client silent for `heartbeat_timeout`; any line counts as life.

use std::os::fd::RawFd;
use std::rc::Rc;

use crate::codec::Wire;
use crate::codec::frame::close_code;
use crate::codec::json::{self as lines, ClientLine, LineDecoder};
use crate::session::{CloseReason, Session};
use crate::shard::Shard;
use crate::token::token_from_json;
use crate::transport::admission;
use crate::transport::{ClientStream, Inbound, answer, close, run_session};

/// Largest token line (the same bound as a WebSocket upgrade request).
const MAX_TOKEN_LINE: usize = 8 * 1024;

/// Serves a JSON-lines client; `first` holds bytes already read from it.
pub(crate) async fn serve<S: ClientStream>(
    shard: &Rc<Shard>,
    mut stream: S,
    direct_fd: Option<RawFd>,
    first: Vec<u8>,
) {
    let Some((session, mut inbound, early)) =
        Box::pin(greet(shard, &mut stream, direct_fd, first)).await
    else {
        return;
    };
    let mut replies = Vec::new();
    let ended = inbound.on_bytes(shard, &session, &early, &mut replies);
    answer(&session, &mut replies);
    let reason = match ended {
        Some(reason) => reason,
        None => run_session(shard, &mut stream, &session, &mut inbound).await,
    };
    shard.unregister(&session, &reason);
    Box::pin(close(shard, &mut stream, &session, reason)).await;
}

/// Reads the token line, admits the client and answers; returns the session, its line
/// decoder and any bytes the client sent after its token line.
async fn greet<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    direct_fd: Option<RawFd>,
    first: Vec<u8>,
) -> Option<(Rc<Session>, Lines, Vec<u8>)> {
    let limit = shard.config.handshake_timeout;
    let deadline = std::time::Instant::now() + limit;
    let mut pending = first;
    let mut chunk = [0u8; 1024];
    let line_end = loop {
        if let Some(end) = pending.iter().position(|&b| b == b'\n') {
            break end;
        }
        if pending.len() > MAX_TOKEN_LINE {
            refuse(
                shard,
                stream,
                "bad_request",
                &format!("token line longer than {MAX_TOKEN_LINE} bytes"),
            )
            .await;
            return None;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match super::read_within(stream, &mut chunk, left).await {
            Some(n) if n > 0 => pending.extend_from_slice(&chunk[..n]),
            Some(_) => {
                shard.handshake_refused("gone");
                return None;
            }
            None => {
                shard.handshake_refused("timeout");
                tracing::info!(shard = shard.id, "token line not received in time");
                return None;
            }
        }
    };
    let early = pending.split_off(line_end + 1);
    let token = match token_from_json(&pending[..line_end]) {
        Ok(token) => token,
        Err(err) => {
            refuse(shard, stream, "token", &err.to_string()).await;
            return None;
        }
    };
    let admitted = match admission::admit_watching(shard, token, direct_fd).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            refuse(shard, stream, refusal.label(), &refusal.to_string()).await;
            return None;
        }
    };
    let welcome = lines::welcome_line(admitted.conn_id());
    if !crate::transport::write_reply(stream, &welcome, limit).await {
        shard.handshake_refused("gone");
        return None;
    }
    let session = admitted.register(Wire::JsonLines, Box::default(), direct_fd);
    Some((session, Lines::default(), early))
}

async fn refuse<S: ClientStream>(shard: &Shard, stream: &mut S, label: &'static str, reason: &str) {
    shard.handshake_refused(label);
    tracing::info!(shard = shard.id, reason, "JSON-lines client refused");
    let line = lines::error_line(reason);
    if crate::transport::write_reply(stream, &line, shard.config.close_timeout).await {
        let _ = super::with_deadline(
            futures_lite::AsyncWriteExt::close(stream),
            shard.config.close_timeout,
        )
        .await;
    }
}

/// The lines of a registered client.
#[derive(Default)]
struct Lines {
    decoder: LineDecoder,
    complained: bool,
}

impl Inbound for Lines {
    fn on_bytes(
        &mut self,
        shard: &Shard,
        session: &Session,
        bytes: &[u8],
        replies: &mut Vec<u8>,
    ) -> Option<CloseReason> {
        let complained = &mut self.complained;
        let fed = self.decoder.feed(bytes, shard.config.max_frame_size, |line| {
            match lines::parse_client_line(line) {
                Ok(ClientLine::Ping) => {
                    replies.extend_from_slice(lines::PONG_LINE);
                }
                Ok(ClientLine::Pong) | Ok(ClientLine::Blank) => {}
                Ok(ClientLine::Data) => {
                    tracing::debug!(conn_id = ?session.conn_id, bytes = line.len(), "client message");
                }
                Err(why) => {
                    // Answered every time, logged once per connection.
                    if !std::mem::replace(complained, true) {
                        tracing::info!(conn_id = ?session.conn_id, error = %why, "client sent a bad line");
                    }
                    replies.extend_from_slice(&lines::error_line(&why));
                }
            }
        });
        match fed {
            Ok(()) => None,
            Err(too_long) => {
                tracing::info!(conn_id = ?session.conn_id, error = %too_long, "closing client for a long line");
                Some(CloseReason::Protocol {
                    code: close_code::TOO_BIG,
                    why: too_long.to_string().into(),
                })
            }
        }
    }
}
