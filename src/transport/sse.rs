//! Server-Sent Events clients: `GET <sse_path>?t=<token object>` on the WebSocket port
//! (plain or TLS), answered with `200 text/event-stream`, each push one event.
//!
//! The request is read and parsed by the WebSocket transport's handshake (same port,
//! same 8 KiB bound and `handshake_timeout`); this module admits the client through
//! `admission` like every transport, writes the stream's head and registers the session,
//! which then runs in the shared session loop (`transport::run_session`). An event-stream
//! client says nothing after its request, so its session is kept by the keep-alive
//! comments the shard sends every `ping_interval` and ends on EOF, a failed write, a full
//! queue (slow consumer), kick, replace or shutdown (the last three after an event named
//! `close`). Never blocks; holds nothing per connection beyond the session.

use std::os::fd::RawFd;
use std::rc::Rc;

use crate::codec::{Wire, sse};
use crate::session::{CloseReason, Session};
use crate::shard::Shard;
use crate::transport::admission::{self, Refusal};
use crate::transport::ws::handshake::EventStreamRequest;
use crate::transport::{ClientStream, Inbound, tcp, write_reply};

/// Why an event stream did not start.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Admission refused the client (the caller answers with the HTTP status).
    Refused(Refusal),
    /// The client left before the stream's head was written.
    Gone,
}

/// Admits the client and starts its stream: the `200` head and the `retry:` field, then
/// the registered session.
pub(crate) async fn accept<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    request: EventStreamRequest,
    direct_fd: Option<RawFd>,
) -> Result<Rc<Session>, Failure> {
    let admitted = admission::admit_watching(shard, request.token, direct_fd)
        .await
        .map_err(Failure::Refused)?;
    let head = response_head(
        request.origin.as_deref(),
        shard.config.sse_retry.as_millis(),
    );
    if !write_reply(stream, &head, shard.config.handshake_timeout).await {
        return Err(Failure::Gone);
    }
    if let Some(fd) = direct_fd {
        // Nothing comes back from an event-stream client to show it is alive: a peer
        // that vanished without a FIN is found by TCP keepalive (and by the writes).
        tcp::enable_keepalive(
            fd,
            shard.config.ping_interval,
            shard.config.heartbeat_timeout,
        );
    }
    Ok(admitted.register(Wire::Sse, Box::default(), direct_fd))
}

/// The response head and the first bytes of the stream. The body is delimited by the
/// connection's close (no length, no chunking: every HTTP/1.1 client and proxy reads it
/// so). `X-Accel-Buffering: no` keeps nginx from holding events back.
fn response_head(origin: Option<&str>, retry_millis: u128) -> Vec<u8> {
    let cors = origin
        .map(|origin| format!("Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
         X-Accel-Buffering: no\r\n{cors}Connection: close\r\n\r\n{}",
        sse::retry_field(retry_millis)
    )
    .into_bytes()
}

/// What an event-stream client sends after its request: nothing it may (the request had
/// no body). Whatever arrives is read through the shard's scratch buffer and dropped, so
/// it costs no memory; EOF ends the session as for any transport.
pub(crate) struct Quiet;

impl Inbound for Quiet {
    fn on_bytes(
        &mut self,
        _: &Shard,
        session: &Session,
        bytes: &[u8],
        _: &mut Vec<u8>,
    ) -> Option<CloseReason> {
        tracing::debug!(conn_id = ?session.conn_id, bytes = bytes.len(), "event-stream client sent bytes: ignored");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_is_byte_for_byte_what_protocol_md_shows() {
        let head = String::from_utf8(response_head(None, 2000)).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             X-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 2000\n\n"
        );
        let cors = String::from_utf8(response_head(Some("https://app.example.com"), 5)).unwrap();
        assert!(cors.contains(
            "\r\nAccess-Control-Allow-Origin: https://app.example.com\r\nVary: Origin\r\n"
        ));
    }
}
