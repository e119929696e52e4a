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
    /// The client broke the framing rules or the size limit.
    Protocol(FrameError),
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
            CloseReason::Protocol(_) => "protocol_error",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// The close frame to send, if the client can still be told anything.
    pub fn close_frame(&self) -> Option<EncodedFrame> {
        let (code, text) = match self {
            CloseReason::ClientGone => return None,
            CloseReason::ClientClosed => (close_code::NORMAL, String::new()),
            CloseReason::HeartbeatTimeout => (close_code::POLICY, "heartbeat timeout".into()),
            CloseReason::Kicked => (close_code::NORMAL, "kicked".into()),
            CloseReason::Replaced => (close_code::POLICY, "replaced by a newer connection".into()),
            CloseReason::SlowConsumer => (close_code::POLICY, "slow consumer".into()),
            CloseReason::Protocol(err) => (err.close_code(), err.to_string()),
            CloseReason::Shutdown => (close_code::GOING_AWAY, "going away".into()),
        };
        Some(EncodedFrame::close(code, &text))
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

/// A frame waiting to be written, and how much of it already was.
pub struct Outgoing {
    /// The shared frame.
    pub frame: Arc<EncodedFrame>,
    /// Bytes of it already written.
    pub written: usize,
}

/// A connected client.
pub struct Session {
    /// The id message servers push to.
    pub conn_id: Rc<str>,
    /// Opaque client data handed back on callbacks.
    pub info: String,
    fd: RawFd,
    queue_limit: usize,
    queue: RefCell<VecDeque<Outgoing>>,
    queued_messages: Cell<usize>,
    waker: RefCell<Option<Waker>>,
    close: RefCell<Option<CloseReason>>,
    last_seen: Cell<Instant>,
    last_ping: Cell<Instant>,
    groups: RefCell<Vec<Rc<str>>>,
}

impl Session {
    /// A session writing to `fd` (owned by the connection task, which outlives the session's
    /// presence in the shard table).
    pub fn new(conn_id: Rc<str>, info: String, fd: RawFd, queue_limit: usize) -> Session {
        let now = Instant::now();
        Session {
            conn_id,
            info,
            fd,
            queue_limit,
            queue: RefCell::new(VecDeque::new()),
            queued_messages: Cell::new(0),
            waker: RefCell::new(None),
            close: RefCell::new(None),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
            groups: RefCell::new(Vec::new()),
        }
    }

    /// Hands a frame to the client: written at once when nothing is queued before it,
    /// queued otherwise. Control frames (pings, pongs) never count against the bound.
    pub fn deliver(&self, frame: &Arc<EncodedFrame>) -> Delivery {
        if self.close.borrow().is_some() {
            return Delivery::Closed;
        }
        let mut queue = self.queue.borrow_mut();
        if queue.is_empty() {
            return match sys::send_now(self.fd, frame.bytes()) {
                Ok(n) if n == frame.bytes().len() => Delivery::Sent,
                Ok(written) => {
                    self.push_back(&mut queue, frame, written);
                    drop(queue);
                    self.wake();
                    Delivery::Queued
                }
                Err(_) => {
                    drop(queue);
                    self.request_close(CloseReason::ClientGone);
                    Delivery::Closed
                }
            };
        }
        if frame.is_message() && self.queued_messages.get() >= self.queue_limit {
            drop(queue);
            self.request_close(CloseReason::SlowConsumer);
            return Delivery::Overflow;
        }
        self.push_back(&mut queue, frame, 0);
        Delivery::Queued
    }

    fn push_back(&self, queue: &mut VecDeque<Outgoing>, frame: &Arc<EncodedFrame>, written: usize) {
        if frame.is_message() {
            self.queued_messages.set(self.queued_messages.get() + 1);
        }
        queue.push_back(Outgoing {
            frame: Arc::clone(frame),
            written,
        });
    }

    /// Gives the connection task access to the queue to flush it. With `coalesce`, messages
    /// that are waiting (none of their bytes written yet) are first joined into one frame.
    pub fn with_queue<R>(&self, coalesce: bool, f: impl FnOnce(&mut VecDeque<Outgoing>) -> R) -> R {
        let mut queue = self.queue.borrow_mut();
        if coalesce {
            coalesce_waiting(&mut queue);
        }
        let result = f(&mut queue);
        // Recounted rather than tracked: the flush and the coalescing both change it, and
        // the queue is short (bounded) and only flushed when a client fell behind.
        let waiting = queue.iter().filter(|o| o.frame.is_message()).count();
        self.queued_messages.set(waiting);
        if queue.is_empty() && queue.capacity() > 16 {
            *queue = VecDeque::new();
        }
        result
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
/// frame and control frames) into one `\n`-separated frame.
fn coalesce_waiting(queue: &mut VecDeque<Outgoing>) {
    let first_waiting = queue
        .iter()
        .rposition(|o| o.written > 0 || !o.frame.is_message())
        .map_or(0, |i| i + 1);
    if queue.len() - first_waiting < 2 {
        return;
    }
    let joined = EncodedFrame::coalesce(queue.range(first_waiting..).map(|o| &*o.frame));
    queue.truncate(first_waiting);
    queue.push_back(Outgoing {
        frame: Arc::new(joined),
        written: 0,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outgoing(frame: EncodedFrame, written: usize) -> Outgoing {
        Outgoing {
            frame: Arc::new(frame),
            written,
        }
    }

    #[test]
    fn coalescing_joins_only_untouched_messages() {
        let mut queue = VecDeque::new();
        queue.push_back(outgoing(EncodedFrame::text(b"partly"), 3));
        queue.push_back(outgoing(EncodedFrame::text(b"a"), 0));
        queue.push_back(outgoing(EncodedFrame::text(b"b"), 0));
        coalesce_waiting(&mut queue);
        assert_eq!(queue.len(), 2);
        assert_eq!(queue[1].frame.payload(), b"a\nb");
    }

    #[test]
    fn coalescing_leaves_control_frames_in_place() {
        let mut queue = VecDeque::new();
        queue.push_back(outgoing(EncodedFrame::text(b"a"), 0));
        queue.push_back(outgoing(EncodedFrame::ping(), 0));
        queue.push_back(outgoing(EncodedFrame::text(b"b"), 0));
        coalesce_waiting(&mut queue);
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn close_reasons_pick_codes() {
        let frame = CloseReason::SlowConsumer.close_frame().unwrap();
        assert_eq!(&frame.payload()[..2], &close_code::POLICY.to_be_bytes());
        assert!(CloseReason::ClientGone.close_frame().is_none());
        assert!(CloseReason::Kicked.flushes_queue());
        assert!(!CloseReason::SlowConsumer.flushes_queue());
    }
}
