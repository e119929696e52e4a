//! Raw TCP clients: one socket, one message protocol, chosen by `tcp_protocol` or, in
//! `auto` mode, by the first byte the client sends (`{` starts JSON-lines, anything else
//! is RESP, which Redis clients and `nc` users both start with a command).
//!
//! Runs on a shard, one task per connection, and never blocks. The protocols themselves
//! live in [`json`] and [`resp`]; this module only picks one and owns what they share.

pub(crate) mod json;
pub(crate) mod resp;

use std::os::fd::RawFd;
use std::time::Duration;

use futures_lite::AsyncReadExt;

use crate::config::TcpProtocol;
use crate::shard::{LiveConnection, Shard};
use crate::transport::{ClientStream, with_deadline};

/// Serves one raw TCP connection to its end.
pub(crate) async fn serve<S: ClientStream>(
    live: LiveConnection,
    mut stream: S,
    direct_fd: Option<RawFd>,
) {
    let shard = live.shard();
    let (protocol, first) = match shard.config.tcp_protocol {
        TcpProtocol::Json => (TcpProtocol::Json, Vec::new()),
        TcpProtocol::Resp => (TcpProtocol::Resp, Vec::new()),
        TcpProtocol::Auto => match first_bytes(shard, &mut stream).await {
            Some(bytes) if bytes.first() == Some(&b'{') => (TcpProtocol::Json, bytes),
            Some(bytes) => (TcpProtocol::Resp, bytes),
            None => return,
        },
    };
    match protocol {
        TcpProtocol::Json => json::serve(shard, stream, direct_fd, first).await,
        _ => resp::serve(shard, stream, direct_fd, first).await,
    }
}

/// The first read, within the handshake timeout; `None` if the client said nothing
/// (counted as a timeout, or as gone when it closed or reset first).
async fn first_bytes<S: ClientStream>(shard: &Shard, stream: &mut S) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 512];
    match read_within(stream, &mut buf, shard.config.handshake_timeout).await {
        Some(n) if n > 0 => {
            buf.truncate(n);
            Some(buf)
        }
        Some(_) => {
            shard.handshake_refused("gone");
            None
        }
        None => {
            shard.handshake_refused("timeout");
            None
        }
    }
}

/// Turns on TCP keepalive: probes after `ping_interval` of silence, then every third of
/// it, the connection dropped after three unanswered. RESP clients cannot be pinged by
/// the server, so this is how a dead one is found (JSON-lines clients have both). Data
/// sent and never acknowledged is given up on after `heartbeat_timeout` plus two ping
/// intervals: past the slow-consumer sweep (`heartbeat_timeout`, checked every
/// interval), so that a live client that stops reading is still closed and counted as
/// the slow consumer it is, not as a dead peer (the kernel's timeout counts a zero
/// receive window too).
pub(crate) fn enable_keepalive(fd: RawFd, ping_interval: Duration, heartbeat_timeout: Duration) {
    let interval = (ping_interval / 3).max(Duration::from_secs(1));
    let unacknowledged = heartbeat_timeout + ping_interval * 2;
    crate::sys::set_keepalive(fd, ping_interval, interval, 3, unacknowledged);
}

/// One read before `limit`: `Some(n)` bytes (0 at EOF or on an error: a client that
/// resets its connection has left, it did not time out), `None` on timeout.
async fn read_within<S: ClientStream>(
    stream: &mut S,
    buf: &mut [u8],
    limit: Duration,
) -> Option<usize> {
    match with_deadline(stream.read(buf), limit).await {
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => Some(0),
        None => None,
    }
}
