//! One connected client as its shard sees it: identity, outbound queue, heartbeat clock
//! and the reason it is closing.
//!
//! A session lives in exactly one shard's table and is touched only by that shard's
//! thread (hence `Rc`/`Cell`, no locks). It never performs blocking I/O: a push is written
//! with a non-blocking `send(2)` when the queue is empty, otherwise queued for the
//! connection task, which is woken to flush it. The queue is bounded; overflowing it makes
//! the client a slow consumer.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use crate::codec::{Message, Wire, json};
use crate::sys;
use crate::transport::ws::frame::{EncodedFrame, FrameError, close_code};

/// Why a session ends. Decides the close frame the client gets and whether what is
/// queued is flushed first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame.
    ClientClosed,
    /// The client's socket reached EOF or failed.
    ClientGone,
    /// Nothing heard from the client within `heartbeat_timeout`.
    HeartbeatTimeout,
    /// Kicked through the push RPC.
    Kicked,
    /// A newer connection with the same conn_id took over.
    Replaced,
    /// The outbound queue overflowed.
    SlowConsumer,
    /// The client broke the framing rules or a size limit: the close code and why.
    Protocol { code: u16, why: Box<str> },
    /// The node is shutting down.
    Shutdown,
}

impl CloseReason {
    /// A short label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ClientGone => "client_gone",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Kicked => "kicked",
            CloseReason::Replaced => "replaced",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Protocol { .. } => "protocol_error",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// The last words the client gets on `wire` before its connection closes, if it can
    /// still be told anything (RESP has no way to say why a connection ends).
    pub fn farewell(&self, wire: Wire) -> Option<Arc<[u8]>> {
        let (code, text) = match self {
            CloseReason::ClientGone => return None,
            CloseReason::ClientClosed => (close_code::NORMAL, String::new()),
            CloseReason::HeartbeatTimeout => (close_code::POLICY, "heartbeat timeout".into()),
            CloseReason::Kicked => (close_code::NORMAL, "kicked".into()),
            CloseReason::Replaced => (close_code::POLICY, "replaced by a newer connection".into()),
            CloseReason::SlowConsumer => (close_code::POLICY, "slow consumer".into()),
            CloseReason::Protocol { code, why } => (*code, why.to_string()),
            CloseReason::Shutdown => (close_code::GOING_AWAY, "going away".into()),
        };
        match wire {
            Wire::WebSocket => Some(EncodedFrame::close(code, &text).bytes().into()),
            Wire::JsonLines => Some(json::close_line(code, &text).into()),
            Wire::Resp => None,
        }
    }

    /// A WebSocket framing violation.
    pub fn bad_frame(err: &FrameError) -> CloseReason {
        CloseReason::Protocol {
            code: err.close_code(),
            why: err.to_string().into(),
        }
    }

    /// Whether queued messages are still worth flushing before the close frame.
    pub fn flushes_queue(&self) -> bool {
        matches!(
            self,
            CloseReason::ClientClosed
                | CloseReason::Kicked
                | CloseReason::Replaced
                | CloseReason::Shutdown
        )
    }
}

/// The result of handing one frame to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the socket.
    Sent,
    /// Queued behind earlier frames; the connection task will write it.
    Queued,
    /// The queue was full: the session is now closing as a slow consumer.
    Overflow,
    /// The session is already closing.
    Closed,
}

impl Delivery {
    /// Whether the frame is on its way to the client.
    pub fn accepted(self) -> bool {
        matches!(self, Delivery::Sent | Delivery::Queued)
    }
}

/// Something waiting to be written to a client.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A pushed message (counts against the queue bound, may be coalesced).
    Message(Arc<Message>),
    /// Protocol bytes of the connection's own: pings, pongs, command replies, farewells.
    Control(Arc<[u8]>),
}

/// An outbound item and how much of it was already written.
pub struct Outgoing {
    /// What to write.
    pub item: Outbound,
    /// Bytes of it already written.
    pub written: usize,
}

/// How a session's items become bytes: the wire format, and for RESP the per-connection
/// head (`message` array naming the channel) that precedes each shared payload.
#[derive(Clone, Copy)]
pub struct Framing<'a> {
    wire: Wire,
    message_head: &'a [u8],
}

impl<'a> Framing<'a> {
    /// The bytes of `outgoing` not yet written, in order (either part may be empty).
    pub fn unwritten(self, outgoing: &'a Outgoing) -> [&'a [u8]; 2] {
        let [head, body] = match &outgoing.item {
            Outbound::Message(message) => [self.message_head, message.encoded(self.wire)],
            Outbound::Control(bytes) => [&bytes[..], &[][..]],
        };
        let skip = outgoing.written;
        if skip < head.len() {
            [&head[skip..], body]
        } else {
            [&body[skip - head.len()..], &[][..]]
        }
    }
}

/// A connected client.
pub struct Session {
    /// The id message servers push to.
    pub conn_id: Rc<str>,
    /// Opaque client data handed back on callbacks.
    pub info: String,
    wire: Wire,
    // Written before each message on RESP (empty otherwise). Kept beside `wire` rather
    // than in an enum with it: the enum would need a tag word, and a session must fit a
    // 256-byte allocation.
    message_head: Box<[u8]>,
    direct_fd: Option<RawFd>,
    // u32 (the config caps it at 2^20): one of the fields that keep a session within a
    // 256-byte allocation.
    queue_limit: u32,
    queue: RefCell<VecDeque<Outgoing>>,
    queued_messages: Cell<usize>,
    waker: RefCell<Option<Waker>>,
    close: RefCell<Option<CloseReason>>,
    last_seen: Cell<Instant>,
    last_ping: Cell<Instant>,
    groups: RefCell<Vec<Rc<str>>>,
}

/// What a new session is: who, which framing, and how to reach its socket.
pub struct SessionSpec {
    /// The client's conn_id.
    pub conn_id: Rc<str>,
    /// The client's `info`.
    pub info: String,
    /// The framing the client speaks.
    pub wire: Wire,
    /// Written before each message's shared bytes (RESP's `message` array head; ignored
    /// for the other wires).
    pub message_head: Box<[u8]>,
    /// The plain socket, when pushes may be written straight into it (not with TLS,
    /// whose records only the connection task can write). The connection task owns it
    /// and outlives the session's presence in the shard table.
    pub direct_fd: Option<RawFd>,
    /// Most messages queued before the client is a slow consumer.
    pub queue_limit: usize,
}

impl Session {
    /// A session as `spec` describes it.
    pub fn new(spec: SessionSpec) -> Session {
        let now = Instant::now();
        Session {
            conn_id: spec.conn_id,
            info: spec.info,
            wire: spec.wire,
            message_head: match spec.wire {
                Wire::Resp => spec.message_head,
                Wire::WebSocket | Wire::JsonLines => Box::default(),
            },
            direct_fd: spec.direct_fd,
            queue_limit: u32::try_from(spec.queue_limit).unwrap_or(u32::MAX),
            queue: RefCell::new(VecDeque::new()),
            queued_messages: Cell::new(0),
            waker: RefCell::new(None),
            close: RefCell::new(None),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
            groups: RefCell::new(Vec::new()),
        }
    }

    /// Hands a pushed message to the client (see [`Session::send`]).
    pub fn deliver(&self, message: &Arc<Message>) -> Delivery {
        self.send(Outbound::Message(Arc::clone(message)))
    }

    /// Hands protocol bytes (ping, pong, reply) to the client; never counts against the
    /// queue bound.
    pub fn send_control(&self, bytes: &Arc<[u8]>) -> Delivery {
        self.send(Outbound::Control(Arc::clone(bytes)))
    }

    /// Writes `item` at once when nothing is queued before it and the socket takes it,
    /// queues it otherwise.
    fn send(&self, item: Outbound) -> Delivery {
        if self.close.borrow().is_some() {
            return Delivery::Closed;
        }
        let mut queue = self.queue.borrow_mut();
        let is_message = matches!(item, Outbound::Message(_));
        if !queue.is_empty() {
            if is_message && self.queued_messages.get() >= self.queue_limit as usize {
                drop(queue);
                self.request_close(CloseReason::SlowConsumer);
                return Delivery::Overflow;
            }
            self.push_back(&mut queue, item, 0);
            return Delivery::Queued;
        }
        let mut outgoing = Outgoing { item, written: 0 };
        if let Some(fd) = self.direct_fd {
            let parts = self.framing().unwritten(&outgoing);
            match sys::send_parts_now(fd, &parts) {
                Ok(n) if n == parts[0].len() + parts[1].len() => return Delivery::Sent,
                Ok(n) => outgoing.written = n,
                Err(_) => {
                    drop(queue);
                    self.request_close(CloseReason::ClientGone);
                    return Delivery::Closed;
                }
            }
        }
        self.push_back(&mut queue, outgoing.item, outgoing.written);
        drop(queue);
        self.wake();
        Delivery::Queued
    }

    fn push_back(&self, queue: &mut VecDeque<Outgoing>, item: Outbound, written: usize) {
        if matches!(item, Outbound::Message(_)) {
            self.queued_messages.set(self.queued_messages.get() + 1);
        }
        queue.push_back(Outgoing { item, written });
    }

    /// The plain socket pushes are written into directly, if there is one.
    pub fn direct_fd(&self) -> Option<RawFd> {
        self.direct_fd
    }

    /// The framing the client speaks.
    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// How this session's items become bytes.
    pub fn framing(&self) -> Framing<'_> {
        Framing {
            wire: self.wire,
            message_head: &self.message_head,
        }
    }

    /// Gives the connection task access to the queue to flush it. With `coalesce`, messages
    /// that are waiting (none of their bytes written yet) are first joined into one.
    pub fn with_queue<R>(
        &self,
        coalesce: bool,
        f: impl FnOnce(&mut VecDeque<Outgoing>, Framing<'_>) -> R,
    ) -> R {
        let mut queue = self.queue.borrow_mut();
        if coalesce {
            coalesce_waiting(&mut queue);
        }
        let result = f(&mut queue, self.framing());
        // Recounted rather than tracked: the flush and the coalescing both change it, and
        // the queue is short (bounded) and only flushed when a client fell behind.
        let waiting = queue
            .iter()
            .filter(|o| matches!(o.item, Outbound::Message(_)))
            .count();
        self.queued_messages.set(waiting);
        if queue.is_empty() && queue.capacity() > 16 {
            *queue = VecDeque::new();
        }
        result
    }

    /// Puts protocol bytes at the back of the queue without trying to write them (the
    /// closing handshake flushes them itself).
    pub fn queue_control(&self, bytes: Arc<[u8]>) {
        self.queue.borrow_mut().push_back(Outgoing {
            item: Outbound::Control(bytes),
            written: 0,
        });
    }

    /// Drops whatever is queued (a slow consumer's backlog is not worth sending).
    pub fn discard_queue(&self) {
        *self.queue.borrow_mut() = VecDeque::new();
        self.queued_messages.set(0);
    }

    /// Whether frames are waiting to be written.
    pub fn has_backlog(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Messages queued and not yet fully written.
    pub fn backlog_messages(&self) -> usize {
        self.queued_messages.get()
    }

    /// Asks the connection task to end the session. The first reason wins.
    pub fn request_close(&self, reason: CloseReason) {
        let mut close = self.close.borrow_mut();
        if close.is_none() {
            *close = Some(reason);
            drop(close);
            self.wake();
        }
    }

    /// The reason the session is closing, if it is.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close.borrow().clone()
    }

    /// Records that the client was heard from (any bytes at all).
    pub fn touch(&self, now: Instant) {
        self.last_seen.set(now);
    }

    /// When the client was last heard from.
    pub fn last_seen(&self) -> Instant {
        self.last_seen.get()
    }

    /// When we last pinged the client.
    pub fn last_ping(&self) -> Instant {
        self.last_ping.get()
    }

    /// Records a heartbeat ping sent at `now`.
    pub fn pinged(&self, now: Instant) {
        self.last_ping.set(now);
    }

    /// Records membership of a group (the shard's group table holds the other side).
    pub fn joined(&self, group: Rc<str>) {
        self.groups.borrow_mut().push(group);
    }

    /// Forgets membership of a group.
    pub fn left(&self, group: &str) {
        self.groups.borrow_mut().retain(|g| &**g != group);
    }

    /// The groups this session is in, emptied (it is leaving them all).
    pub fn take_groups(&self) -> Vec<Rc<str>> {
        std::mem::take(&mut *self.groups.borrow_mut())
    }

    /// Stores the connection task's waker so that pushes and close requests can wake it.
    pub fn set_waker(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        match slot.as_ref() {
            Some(current) if current.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.borrow().as_ref() {
            waker.wake_by_ref();
        }
    }
}

/// Joins the run of whole messages at the back of the queue (after any partly written
/// item and control bytes) into one `\n`-separated message: the original's framing for
/// WebSocket clients that read several messages from one frame.
fn coalesce_waiting(queue: &mut VecDeque<Outgoing>) {
    let first_waiting = queue
        .iter()
        .rposition(|o| o.written > 0 || matches!(o.item, Outbound::Control(_)))
        .map_or(0, |i| i + 1);
    if queue.len() - first_waiting < 2 {
        return;
    }
    let mut payload = Vec::new();
    for (i, outgoing) in queue.range(first_waiting..).enumerate() {
        if let Outbound::Message(message) = &outgoing.item {
            if i > 0 {
                payload.push(b'\n');
            }
            payload.extend_from_slice(message.payload());
        }
    }
    queue.truncate(first_waiting);
    queue.push_back(Outgoing {
        item: Outbound::Message(Message::new(&payload)),
        written: 0,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str, written: usize) -> Outgoing {
        Outgoing {
            item: Outbound::Message(Message::new(text.as_bytes())),
            written,
        }
    }

    fn payload(outgoing: &Outgoing) -> Vec<u8> {
        match &outgoing.item {
            Outbound::Message(m) => m.payload().to_vec(),
            Outbound::Control(bytes) => bytes.to_vec(),
        }
    }

    #[test]
    fn coalescing_joins_only_untouched_messages() {
        let mut queue = VecDeque::new();
        queue.push_back(message("partly", 3));
        queue.push_back(message("a", 0));
        queue.push_back(message("b", 0));
        coalesce_waiting(&mut queue);
        assert_eq!(queue.len(), 2);
        assert_eq!(payload(&queue[1]), b"a\nb");
    }

    #[test]
    fn coalescing_leaves_control_bytes_in_place() {
        let mut queue = VecDeque::new();
        queue.push_back(message("a", 0));
        queue.push_back(Outgoing {
            item: Outbound::Control(EncodedFrame::ping().bytes().into()),
            written: 0,
        });
        queue.push_back(message("b", 0));
        coalesce_waiting(&mut queue);
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn unwritten_bytes_span_the_head_and_the_shared_payload() {
        let framing = Framing {
            wire: Wire::Resp,
            message_head: b"HEAD",
        };
        let mut outgoing = message("hi", 2);
        assert_eq!(framing.unwritten(&outgoing), [&b"AD"[..], b"$2\r\nhi\r\n"]);
        outgoing.written = 7;
        assert_eq!(framing.unwritten(&outgoing), [&b"\nhi\r\n"[..], b""]);
    }

    #[test]
    fn farewells_depend_on_the_wire() {
        let frame = CloseReason::SlowConsumer.farewell(Wire::WebSocket).unwrap();
        assert_eq!(&frame[2..4], &close_code::POLICY.to_be_bytes());
        let line = CloseReason::Shutdown.farewell(Wire::JsonLines).unwrap();
        assert!(line.starts_with(b"{\"type\":\"close\",\"code\":1001"));
        assert!(CloseReason::Shutdown.farewell(Wire::Resp).is_none());
        assert!(CloseReason::ClientGone.farewell(Wire::WebSocket).is_none());
        assert!(CloseReason::Kicked.flushes_queue());
        assert!(!CloseReason::SlowConsumer.flushes_queue());
    }
}
