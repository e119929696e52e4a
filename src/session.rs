//! One connected client as its shard sees it: identity, outbound queue, heartbeat clock
//! and the reason it is closing.
//!
//! A session lives in exactly one shard's table and is touched only by that shard's
//! thread (hence `Rc`/`Cell`, no locks). It never performs blocking I/O: a push is written
//! with a non-blocking `send(2)` when the queue is empty, otherwise queued for the
//! connection task, which is woken to flush it. The queue is bounded twice, in messages
//! and in bytes: pushes and the connection's own replies (pongs, errors, RESP replies)
//! share one byte budget, kept as a running count. Past the budget the connection task
//! stops reading the client (so a client that sends and never reads cannot make us
//! queue replies without end), and a push that would overflow it makes the client a slow
//! consumer.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use crate::codec::frame::{EncodedFrame, FrameError, close_code};
use crate::codec::{Message, Wire, json, sse};
use crate::sys;

/// Why a session ends. Decides the close frame the client gets and whether what is
/// queued is flushed first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseReason {
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
    /// The connection's task panicked (see `panics`): a bug of ours, not the client's.
    InternalError,
}

/// RFC 6455 §7.4.1: the server hit a condition that kept it from serving the request.
const INTERNAL_ERROR_CODE: u16 = 1011;

impl CloseReason {
    /// A short label for logs.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ClientGone => "client_gone",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::Kicked => "kicked",
            CloseReason::Replaced => "replaced",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Protocol { .. } => "protocol_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::InternalError => "internal_error",
        }
    }

    /// The last words the client gets on `wire` before its connection closes, if it can
    /// still be told anything (RESP has no way to say why a connection ends).
    pub(crate) fn farewell(&self, wire: Wire) -> Option<Arc<[u8]>> {
        let (code, text) = match self {
            CloseReason::ClientGone => return None,
            CloseReason::ClientClosed => (close_code::NORMAL, String::new()),
            CloseReason::HeartbeatTimeout => (close_code::POLICY, "heartbeat timeout".into()),
            CloseReason::Kicked => (close_code::NORMAL, "kicked".into()),
            CloseReason::Replaced => (close_code::POLICY, "replaced by a newer connection".into()),
            CloseReason::SlowConsumer => (close_code::POLICY, "slow consumer".into()),
            CloseReason::Protocol { code, why } => (*code, why.to_string()),
            CloseReason::Shutdown => (close_code::GOING_AWAY, "going away".into()),
            CloseReason::InternalError => (INTERNAL_ERROR_CODE, "internal error".into()),
        };
        match wire {
            Wire::WebSocket | Wire::WebSocketDeflate(_) => {
                Some(EncodedFrame::close(code, &text).bytes().into())
            }
            Wire::JsonLines => Some(json::close_line(code, &text).into()),
            Wire::Sse => Some(sse::close_event(code).into()),
            Wire::Resp => None,
        }
    }

    /// A WebSocket framing violation.
    pub(crate) fn bad_frame(err: &FrameError) -> CloseReason {
        CloseReason::Protocol {
            code: err.close_code(),
            why: err.to_string().into(),
        }
    }

    /// Whether queued messages are still worth flushing before the close frame.
    pub(crate) fn flushes_queue(&self) -> bool {
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
pub(crate) enum Delivery {
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
    pub(crate) fn accepted(self) -> bool {
        matches!(self, Delivery::Sent | Delivery::Queued)
    }
}

/// Something waiting to be written to a client.
#[derive(Debug, Clone)]
pub(crate) enum Outbound {
    /// A pushed message (counts against the queue bound, may be coalesced).
    Message(Arc<Message>),
    /// Protocol bytes of the connection's own: pings, pongs, command replies, farewells.
    Control(Arc<[u8]>),
}

/// An outbound item and how much of it was already written.
pub(crate) struct Outgoing {
    /// What to write.
    pub(crate) item: Outbound,
    /// Bytes of it already written.
    pub(crate) written: usize,
}

/// How a session's items become bytes: the wire format, and for RESP the per-connection
/// head (`message` array naming the channel) that precedes each shared payload.
#[derive(Clone, Copy)]
pub(crate) struct Framing<'a> {
    wire: Wire,
    message_head: &'a [u8],
}

impl<'a> Framing<'a> {
    /// All the bytes `outgoing` puts on the wire, written or not.
    pub(crate) fn len(self, outgoing: &Outgoing) -> usize {
        match &outgoing.item {
            Outbound::Message(message) => {
                self.message_head.len() + message.encoded(self.wire).len()
            }
            Outbound::Control(bytes) => bytes.len(),
        }
    }

    /// The bytes of `outgoing` not yet written, in order (either part may be empty).
    pub(crate) fn unwritten(self, outgoing: &'a Outgoing) -> [&'a [u8]; 2] {
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
pub(crate) struct Session {
    /// The id message servers push to.
    pub(crate) conn_id: Rc<str>,
    /// Opaque client data handed back on callbacks (boxed: 8 bytes less than a String,
    /// which with the deflate settings in `wire` kept the session within 256 bytes).
    pub(crate) info: Box<str>,
    wire: Wire,
    // Written before each message on RESP (empty otherwise). Kept beside `wire` rather
    // than in an enum with it: the enum would need a tag word, and a session must fit a
    // 256-byte allocation.
    message_head: Box<[u8]>,
    direct_fd: Option<RawFd>,
    // u32 (the config caps them at 2^20 messages and 2^30 bytes): fields that keep a
    // session within a 256-byte allocation.
    queue_limit: u32,
    byte_limit: u32,
    queued_messages: Cell<u32>,
    // 248 bytes with it: still within the session's 256-byte allocation.
    recover: bool,
    // Whether its `online` was reported, so that its `offline` is too: a session that
    // registers on a shard a successor took over from is closed at once and reports
    // neither (in the padding after `recover`: the size stays 248 bytes).
    announced: Cell<bool>,
    // Unwritten bytes of everything queued, kept as a running count so that neither the
    // hot path nor a flush ever walks the queue.
    queued_bytes: Cell<usize>,
    queue: RefCell<VecDeque<Outgoing>>,
    waker: RefCell<Option<Waker>>,
    close: RefCell<Option<CloseReason>>,
    last_seen: Cell<Instant>,
    last_ping: Cell<Instant>,
    groups: RefCell<Vec<Rc<str>>>,
}

/// What a new session is: who, which framing, and how to reach its socket.
pub(crate) struct SessionSpec {
    /// The client's conn_id.
    pub(crate) conn_id: Rc<str>,
    /// The client's `info`.
    pub(crate) info: String,
    /// The framing the client speaks.
    pub(crate) wire: Wire,
    /// Written before each message's shared bytes (RESP's `message` array head; ignored
    /// for the other wires).
    pub(crate) message_head: Box<[u8]>,
    /// The plain socket, when pushes may be written straight into it (not with TLS,
    /// whose records only the connection task can write). The connection task owns it
    /// and outlives the session's presence in the shard table.
    pub(crate) direct_fd: Option<RawFd>,
    /// Most messages queued before the client is a slow consumer.
    pub(crate) queue_limit: usize,
    /// Most bytes queued (pushes and replies) before the client is not read from, and a
    /// push overflows.
    pub(crate) queue_bytes: usize,
    /// The client opted in to recovery (and the node keeps buffers): its messages are
    /// numbered, one frame per session (docs/PROTOCOL.md, "Recovery").
    pub(crate) recover: bool,
}

impl Session {
    /// A session as `spec` describes it.
    pub(crate) fn new(spec: SessionSpec) -> Session {
        let now = Instant::now();
        Session {
            conn_id: spec.conn_id,
            info: spec.info.into_boxed_str(),
            wire: spec.wire,
            message_head: match spec.wire {
                Wire::Resp => spec.message_head,
                _ => Box::default(),
            },
            direct_fd: spec.direct_fd,
            queue_limit: u32::try_from(spec.queue_limit).unwrap_or(u32::MAX),
            byte_limit: u32::try_from(spec.queue_bytes).unwrap_or(u32::MAX),
            queued_messages: Cell::new(0),
            recover: spec.recover,
            announced: Cell::new(false),
            queued_bytes: Cell::new(0),
            queue: RefCell::new(VecDeque::new()),
            waker: RefCell::new(None),
            close: RefCell::new(None),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
            groups: RefCell::new(Vec::new()),
        }
    }

    /// Hands a pushed message to the client (see [`Session::send`]).
    pub(crate) fn deliver(&self, message: &Arc<Message>) -> Delivery {
        self.send(Outbound::Message(Arc::clone(message)))
    }

    /// Hands protocol bytes (ping, pong, reply) to the client. They count against the byte
    /// budget but never overflow it: the connection task stops reading the client while
    /// it is over, so replies cannot pile up past one read's worth.
    pub(crate) fn send_control(&self, bytes: &Arc<[u8]>) -> Delivery {
        self.send(Outbound::Control(Arc::clone(bytes)))
    }

    /// Writes `item` at once when nothing is queued before it and the socket takes it,
    /// queues it otherwise.
    fn send(&self, item: Outbound) -> Delivery {
        if self.close.borrow().is_some() {
            return Delivery::Closed;
        }
        let mut queue = self.queue.borrow_mut();
        let mut outgoing = Outgoing { item, written: 0 };
        let len = self.framing().len(&outgoing);
        if !queue.is_empty() {
            if matches!(outgoing.item, Outbound::Message(_)) && self.would_overflow(len) {
                drop(queue);
                self.request_close(CloseReason::SlowConsumer);
                return Delivery::Overflow;
            }
            self.push_back(&mut queue, outgoing, len);
            return Delivery::Queued;
        }
        if let Some(fd) = self.direct_fd {
            let parts = self.framing().unwritten(&outgoing);
            match sys::send_parts_now(fd, &parts) {
                Ok(n) if n == len => return Delivery::Sent,
                Ok(n) => outgoing.written = n,
                Err(_) => {
                    drop(queue);
                    self.request_close(CloseReason::ClientGone);
                    return Delivery::Closed;
                }
            }
        }
        let unwritten = len - outgoing.written;
        self.push_back(&mut queue, outgoing, unwritten);
        drop(queue);
        self.wake();
        Delivery::Queued
    }

    /// Whether one more message of `len` bytes would break either bound. A message that
    /// finds the queue empty is always taken, so one larger than the byte budget still
    /// reaches a client that keeps up.
    fn would_overflow(&self, len: usize) -> bool {
        self.queued_messages.get() >= self.queue_limit
            || self.queued_bytes.get() + len > self.byte_limit as usize
    }

    fn push_back(&self, queue: &mut VecDeque<Outgoing>, outgoing: Outgoing, unwritten: usize) {
        if matches!(outgoing.item, Outbound::Message(_)) {
            self.queued_messages.set(self.queued_messages.get() + 1);
        }
        self.queued_bytes.set(self.queued_bytes.get() + unwritten);
        queue.push_back(outgoing);
    }

    /// Whether the client recovers missed messages: each gets its own numbered frame.
    pub(crate) fn recovers(&self) -> bool {
        self.recover
    }

    /// Records that its `online` was reported (see [`Session::was_announced`]).
    pub(crate) fn mark_announced(&self) {
        self.announced.set(true);
    }

    /// Whether its `online` was reported: only then is its `offline`.
    pub(crate) fn was_announced(&self) -> bool {
        self.announced.get()
    }

    /// The plain socket pushes are written into directly, if there is one.
    pub(crate) fn direct_fd(&self) -> Option<RawFd> {
        self.direct_fd
    }

    /// The framing the client speaks.
    pub(crate) fn wire(&self) -> Wire {
        self.wire
    }

    /// How this session's items become bytes.
    pub(crate) fn framing(&self) -> Framing<'_> {
        Framing {
            wire: self.wire,
            message_head: &self.message_head,
        }
    }

    /// Gives the connection task the queue to flush it. With `coalesce`, messages that are
    /// waiting (none of their bytes written yet) are first joined into one.
    pub(crate) fn with_backlog<R>(
        &self,
        coalesce: bool,
        f: impl FnOnce(&mut Backlog<'_>) -> R,
    ) -> R {
        let mut queue = self.queue.borrow_mut();
        let mut backlog = Backlog {
            queue: &mut queue,
            framing: self.framing(),
            messages: &self.queued_messages,
            bytes: &self.queued_bytes,
        };
        if coalesce {
            backlog.coalesce_waiting();
        }
        let result = f(&mut backlog);
        if queue.is_empty() && queue.capacity() > 16 {
            *queue = VecDeque::new();
        }
        result
    }

    /// Takes every unwritten byte out of the queue, in order (a RESP session that ended
    /// hands what it still owed to its connection).
    pub(crate) fn take_unwritten(&self) -> Vec<u8> {
        self.with_backlog(false, |backlog| {
            let mut out = Vec::new();
            while let Some(bytes) = backlog.next_bytes() {
                out.extend_from_slice(bytes);
                let n = bytes.len();
                backlog.advance(n);
            }
            out
        })
    }

    /// Puts protocol bytes at the back of the queue without trying to write them (the
    /// closing handshake flushes them itself).
    pub(crate) fn queue_control(&self, bytes: Arc<[u8]>) {
        let len = bytes.len();
        let outgoing = Outgoing {
            item: Outbound::Control(bytes),
            written: 0,
        };
        self.push_back(&mut self.queue.borrow_mut(), outgoing, len);
    }

    /// Drops whatever is queued (a slow consumer's backlog is not worth sending).
    /// Drops what is queued, except an item already partly on the wire: its remaining
    /// bytes must go before anything else, or the client reads the farewell spliced into
    /// the middle of a message (an event stream then handed its application a truncated
    /// message as if whole, and never saw the `close` event). Returns whether such an
    /// item is left.
    pub(crate) fn discard_queue(&self) -> bool {
        let mut queue = self.queue.borrow_mut();
        let started = queue
            .front()
            .filter(|front| front.written > 0)
            .map(|front| {
                let unwritten = self.framing().len(front) - front.written;
                let is_message = matches!(front.item, Outbound::Message(_));
                (unwritten, is_message)
            });
        queue.truncate(usize::from(started.is_some()));
        let (bytes, messages) = match started {
            Some((unwritten, is_message)) => (unwritten, u32::from(is_message)),
            None => (0, 0),
        };
        self.queued_bytes.set(bytes);
        self.queued_messages.set(messages);
        started.is_some()
    }

    /// Whether the queue holds the whole byte budget: the client is not read from until
    /// it has taken some of it.
    pub(crate) fn is_over_budget(&self) -> bool {
        self.queued_bytes.get() >= self.byte_limit as usize
    }

    /// Unwritten bytes queued.
    pub(crate) fn backlog_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    /// Whether frames are waiting to be written.
    pub(crate) fn has_backlog(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Messages queued and not yet fully written.
    pub(crate) fn backlog_messages(&self) -> usize {
        self.queued_messages.get() as usize
    }

    /// Asks the connection task to end the session. The first reason wins.
    pub(crate) fn request_close(&self, reason: CloseReason) {
        let mut close = self.close.borrow_mut();
        if close.is_none() {
            *close = Some(reason);
            drop(close);
            self.wake();
        }
    }

    /// The reason the session is closing, if it is.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.close.borrow().clone()
    }

    /// Records that the client was heard from (any bytes at all).
    pub(crate) fn touch(&self, now: Instant) {
        self.last_seen.set(now);
    }

    /// When the client was last heard from.
    pub(crate) fn last_seen(&self) -> Instant {
        self.last_seen.get()
    }

    /// When we last pinged the client.
    pub(crate) fn last_ping(&self) -> Instant {
        self.last_ping.get()
    }

    /// Records a heartbeat ping sent at `now`.
    pub(crate) fn pinged(&self, now: Instant) {
        self.last_ping.set(now);
    }

    /// Records membership of a group (the shard's group table holds the other side).
    pub(crate) fn joined(&self, group: Rc<str>) {
        self.groups.borrow_mut().push(group);
    }

    /// Forgets membership of a group.
    pub(crate) fn left(&self, group: &str) {
        self.groups.borrow_mut().retain(|g| &**g != group);
    }

    /// The groups this session is in, emptied (it is leaving them all).
    pub(crate) fn take_groups(&self) -> Vec<Rc<str>> {
        std::mem::take(&mut *self.groups.borrow_mut())
    }

    /// Stores the connection task's waker so that pushes and close requests can wake it.
    pub(crate) fn set_waker(&self, waker: &Waker) {
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

/// A session's queue opened for flushing: the connection task takes the next bytes to
/// write and reports how many the socket took; the session's counters follow.
pub(crate) struct Backlog<'a> {
    queue: &'a mut VecDeque<Outgoing>,
    framing: Framing<'a>,
    messages: &'a Cell<u32>,
    bytes: &'a Cell<usize>,
}

impl Backlog<'_> {
    /// The next bytes to write, if anything is queued.
    pub(crate) fn next_bytes(&mut self) -> Option<&[u8]> {
        while self
            .queue
            .front()
            .is_some_and(|front| front.written >= self.framing.len(front))
        {
            self.pop_front();
        }
        let [first, second] = self.framing.unwritten(self.queue.front()?);
        Some(if first.is_empty() { second } else { first })
    }

    /// Records that the socket took `n` bytes of what [`Backlog::next_bytes`] gave.
    pub(crate) fn advance(&mut self, n: usize) {
        let Some(front) = self.queue.front_mut() else {
            return;
        };
        front.written += n;
        self.bytes.set(self.bytes.get().saturating_sub(n));
        if front.written >= self.framing.len(front) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(done) = self.queue.pop_front()
            && matches!(done.item, Outbound::Message(_))
        {
            self.messages.set(self.messages.get().saturating_sub(1));
        }
    }

    /// Joins the run of whole messages at the back of the queue (after any partly written
    /// item and control bytes) into one `\n`-separated message: the original's framing
    /// for WebSocket clients that read several messages from one frame.
    fn coalesce_waiting(&mut self) {
        let queue = &mut *self.queue;
        let first_waiting = queue
            .iter()
            .rposition(|o| o.written > 0 || matches!(o.item, Outbound::Control(_)))
            .map_or(0, |i| i + 1);
        let joined = queue.len() - first_waiting;
        if joined < 2 {
            return;
        }
        let mut payload = Vec::new();
        let mut old_bytes = 0;
        for (i, outgoing) in queue.range(first_waiting..).enumerate() {
            old_bytes += self.framing.len(outgoing);
            if let Outbound::Message(message) = &outgoing.item {
                if i > 0 {
                    payload.push(b'\n');
                }
                payload.extend_from_slice(message.payload());
            }
        }
        queue.truncate(first_waiting);
        let outgoing = Outgoing {
            item: Outbound::Message(Message::new(&payload)),
            written: 0,
        };
        let new_bytes = self.framing.len(&outgoing);
        queue.push_back(outgoing);
        self.bytes.set(self.bytes.get() - old_bytes + new_bytes);
        self.messages.set(self.messages.get() - joined as u32 + 1);
    }
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

    const WS: Framing<'static> = Framing {
        wire: Wire::WebSocket,
        message_head: b"",
    };

    /// Coalesces `queue` with counters that start right; returns them afterwards.
    fn coalesced(queue: &mut VecDeque<Outgoing>) -> (u32, usize) {
        let messages = queue
            .iter()
            .filter(|o| matches!(o.item, Outbound::Message(_)))
            .count();
        let bytes = queue.iter().map(|o| WS.len(o) - o.written).sum();
        let (messages, bytes) = (Cell::new(messages as u32), Cell::new(bytes));
        Backlog {
            queue,
            framing: WS,
            messages: &messages,
            bytes: &bytes,
        }
        .coalesce_waiting();
        (messages.get(), bytes.get())
    }

    fn session(queue_limit: usize, queue_bytes: usize) -> Session {
        Session::new(SessionSpec {
            conn_id: "c".into(),
            info: String::new(),
            wire: Wire::WebSocket,
            message_head: Box::default(),
            // No socket: everything is queued, as for a client whose socket is full.
            direct_fd: None,
            queue_limit,
            queue_bytes,
            recover: false,
        })
    }

    /// Flushes up to `budget` bytes of the session's queue, `chunk` at a time.
    fn drain(session: &Session, mut budget: usize, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        session.with_backlog(false, |backlog| {
            while budget > 0 {
                let Some(bytes) = backlog.next_bytes() else {
                    break;
                };
                let n = bytes.len().min(chunk).min(budget);
                out.extend_from_slice(&bytes[..n]);
                budget -= n;
                backlog.advance(n);
            }
        });
        out
    }

    #[test]
    fn coalescing_joins_only_untouched_messages() {
        let mut queue = VecDeque::new();
        queue.push_back(message("partly", 3));
        queue.push_back(message("a", 0));
        queue.push_back(message("b", 0));
        let (messages, bytes) = coalesced(&mut queue);
        assert_eq!(queue.len(), 2);
        assert_eq!(payload(&queue[1]), b"a\nb");
        assert_eq!(messages, 2);
        // "partly" framed (2 + 6) less the 3 written, and "a\nb" framed (2 + 3).
        assert_eq!(bytes, 5 + 5);
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
        coalesced(&mut queue);
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn pushes_and_replies_share_one_byte_budget() {
        let session = session(1000, 1024);
        let hundred = Message::new(&[b'x'; 100]);
        // 102 bytes framed each: ten fit with the pong below, the eleventh does not.
        let pong: Arc<[u8]> = Arc::from(&b"PONG-BYTES"[..]);
        assert_eq!(session.send_control(&pong), Delivery::Queued);
        for _ in 0..9 {
            assert_eq!(session.deliver(&hundred), Delivery::Queued);
        }
        assert_eq!(session.backlog_bytes(), 10 + 9 * 102);
        assert!(!session.is_over_budget());
        // Replies never overflow: they are bounded by the reads the budget pauses.
        for _ in 0..20 {
            assert_eq!(session.send_control(&pong), Delivery::Queued);
        }
        assert!(session.is_over_budget(), "reading pauses here");
        assert_eq!(session.deliver(&hundred), Delivery::Overflow);
        assert_eq!(session.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn a_message_larger_than_the_budget_still_goes_to_an_empty_queue() {
        let session = session(1000, 1024);
        let big = Message::new(&[b'x'; 4000]);
        assert_eq!(session.deliver(&big), Delivery::Queued);
        assert!(session.is_over_budget());
        assert_eq!(session.deliver(&Message::new(b"y")), Delivery::Overflow);
    }

    #[test]
    fn the_message_bound_holds_beside_the_byte_bound() {
        let session = session(3, 1 << 20);
        let small = Message::new(b"hi");
        for _ in 0..3 {
            assert_eq!(session.deliver(&small), Delivery::Queued);
        }
        assert_eq!(session.deliver(&small), Delivery::Overflow);
    }

    #[test]
    fn flushing_in_pieces_keeps_the_counters_exact() {
        let session = session(1000, 1 << 20);
        let messages = ["one", "two", "three"].map(|t| Message::new(t.as_bytes()));
        for message in &messages {
            session.deliver(message);
        }
        session.send_control(&Arc::from(&b"ctl"[..]));
        let total = session.backlog_bytes();
        assert_eq!(total, 5 + 5 + 7 + 3);
        let first = drain(&session, 6, 4);
        assert_eq!(first, b"\x81\x03one\x81");
        assert_eq!(session.backlog_bytes(), total - 6);
        assert_eq!(session.backlog_messages(), 2);
        let rest = drain(&session, usize::MAX, 1);
        assert_eq!(rest, b"\x03two\x81\x05threectl");
        assert_eq!(session.backlog_bytes(), 0);
        assert_eq!(session.backlog_messages(), 0);
        assert!(!session.has_backlog());
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
    fn discarding_keeps_a_message_already_partly_written() {
        let session = Session::new(SessionSpec {
            conn_id: "d".into(),
            info: String::new(),
            wire: Wire::WebSocket,
            message_head: Box::default(),
            direct_fd: None,
            queue_limit: 8,
            queue_bytes: 1 << 20,
            recover: false,
        });
        for text in ["first", "second", "third"] {
            session.deliver(&Message::new(text.as_bytes()));
        }
        assert!(!session.discard_queue(), "nothing started: all dropped");
        assert_eq!(
            (session.backlog_messages(), session.backlog_bytes()),
            (0, 0)
        );
        for text in ["first", "second"] {
            session.deliver(&Message::new(text.as_bytes()));
        }
        session.with_backlog(false, |backlog| backlog.advance(3));
        assert!(session.discard_queue(), "the started one stays");
        // "first" framed is 2 + 5 bytes, 3 of them written.
        assert_eq!(
            (session.backlog_messages(), session.backlog_bytes()),
            (1, 4)
        );
        assert_eq!(session.take_unwritten(), b"irst");
    }

    #[test]
    fn a_session_fits_a_256_byte_allocation() {
        assert!(
            std::mem::size_of::<Session>() <= 256,
            "{}",
            std::mem::size_of::<Session>()
        );
    }

    #[test]
    fn farewells_depend_on_the_wire() {
        let frame = CloseReason::SlowConsumer.farewell(Wire::WebSocket).unwrap();
        assert_eq!(&frame[2..4], &close_code::POLICY.to_be_bytes());
        let line = CloseReason::Shutdown.farewell(Wire::JsonLines).unwrap();
        assert!(line.starts_with(b"{\"type\":\"close\",\"code\":1001"));
        assert!(CloseReason::Shutdown.farewell(Wire::Resp).is_none());
        let event = CloseReason::Kicked.farewell(Wire::Sse).unwrap();
        assert_eq!(&event[..], b"event: close\ndata: 1000\n\n");
        assert!(CloseReason::ClientGone.farewell(Wire::WebSocket).is_none());
        assert!(CloseReason::Kicked.flushes_queue());
        assert!(!CloseReason::SlowConsumer.flushes_queue());
    }
}
