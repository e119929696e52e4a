//! The one way into a shard from another thread: a crossbeam channel whose receiving
//! end is awaited on the shard through an [`AtomicWaker`].
//!
//! Senders never block (the channel is unbounded; the control thread bounds what it
//! sends by awaiting each command's reply) and the shard never blocks on the receiver.

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use super::ShardCommand;

/// The control thread's handle on one shard.
#[derive(Clone)]
pub(crate) struct ShardHandle {
    commands: Sender<ShardCommand>,
    waker: Arc<AtomicWaker>,
}

/// The shard's end.
pub(crate) struct Inbox {
    commands: Receiver<ShardCommand>,
    waker: Arc<AtomicWaker>,
}

/// A connected pair.
pub(crate) fn channel() -> (ShardHandle, Inbox) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        ShardHandle {
            commands: tx,
            waker: Arc::clone(&waker),
        },
        Inbox {
            commands: rx,
            waker,
        },
    )
}

impl ShardHandle {
    /// Hands a command to the shard and wakes it. Returns false if the shard has ended.
    pub(crate) fn send(&self, command: ShardCommand) -> bool {
        let sent = self.commands.send(command).is_ok();
        self.waker.wake();
        sent
    }
}

impl Inbox {
    /// The next command; `None` once every handle is dropped.
    pub(crate) async fn recv(&self) -> Option<ShardCommand> {
        poll_fn(|cx| {
            if let Ok(command) = self.commands.try_recv() {
                return Poll::Ready(Some(command));
            }
            self.waker.register(cx.waker());
            // Checked again after registering: a send between the first check and the
            // registration would otherwise wake nobody.
            match self.commands.try_recv() {
                Ok(command) => Poll::Ready(Some(command)),
                Err(TryRecvError::Empty) => Poll::Pending,
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
            }
        })
        .await
    }
}
