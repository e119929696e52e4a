//! The panic policy: a panic inside one client connection's task ends that connection
//! only; a panic anywhere else aborts the process.
//!
//! A connection task is the code that parses a stranger's bytes, so it is where a bug is
//! most likely to be found from outside; containing it there keeps one bad request from
//! costing every other client of the node. Anywhere else (a shard's command loop, the
//! control thread, a presence worker) a panic may leave shared state half-changed, and
//! glommio or tokio would leave the rest of the process running around a dead thread: a
//! node whose clients are frozen while `/readyz` stays green. There the process aborts,
//! so that systemd restarts it, the etcd lease expires and clients reconnect elsewhere.
//!
//! This module owns the hook and the containment wrapper; it knows nothing of sessions.
//! Whoever contains a panic cleans up after it (`Shard::reap_orphans`).

use std::cell::Cell;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// Depth of contained polls running on this thread: a panic here will be caught.
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
}

/// Installs the process-wide hook: log every panic; abort unless it will be contained.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let contained = CONTAINED.with(Cell::get) > 0;
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info.location().map(ToString::to_string).unwrap_or_default();
        if contained {
            tracing::error!(thread, location, message = ?message, "panic in a connection task: closing that connection only");
            return;
        }
        default(info);
        tracing::error!(thread, location, message = ?message, "panic outside a connection task: aborting");
        crate::logging::flush(std::time::Duration::from_millis(200));
        std::process::abort();
    }));
}

/// Runs a connection's future so that a panic in it ends only that future; `on_panic`
/// then runs (after the future and everything it held were dropped).
///
/// A plain struct rather than an `async fn` wrapper: an async wrapper keeps its argument
/// and the future it awaits side by side, and doubled a WebSocket client's task (304 to
/// 640 bytes), which is memory per idle client.
pub(crate) fn contain<F, P>(future: F, on_panic: P) -> Contained<F, P>
where
    F: Future<Output = ()>,
    P: FnOnce(),
{
    Contained {
        future: Some(future),
        on_panic: Some(on_panic),
    }
}

pin_project_lite::pin_project! {
    /// What [`contain`] returns.
    pub(crate) struct Contained<F, P> {
        #[pin]
        future: Option<F>,
        on_panic: Option<P>,
    }
}

impl<F: Future<Output = ()>, P: FnOnce()> Future for Contained<F, P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let mut slot = this.future;
        let Some(future) = slot.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        CONTAINED.with(|depth| depth.set(depth.get() + 1));
        let polled = catch_unwind(AssertUnwindSafe(|| future.poll(cx)));
        CONTAINED.with(|depth| depth.set(depth.get() - 1));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => {
                slot.set(None);
                Poll::Ready(())
            }
            Err(_) => {
                // Dropped now, so that its socket and whatever else it held go at once.
                slot.set(None);
                if let Some(on_panic) = this.on_panic.take() {
                    on_panic();
                }
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: Future>(future: F) -> F::Output {
        futures_lite::future::block_on(future)
    }

    #[test]
    fn a_contained_panic_is_reported_and_the_future_dropped() {
        struct Dropped<'a>(&'a Cell<bool>);
        impl Drop for Dropped<'_> {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let dropped = Cell::new(false);
        let reported = Cell::new(false);
        run(contain(
            async {
                let _held = Dropped(&dropped);
                futures_lite::future::yield_now().await;
                panic!("a bug reached from outside");
            },
            || {
                assert!(dropped.get(), "what the future held is freed first");
                reported.set(true);
            },
        ));
        assert!(reported.get());
        assert_eq!(CONTAINED.with(Cell::get), 0);
    }

    #[test]
    fn a_future_that_ends_normally_is_not_a_panic() {
        let reported = Cell::new(false);
        run(contain(async {}, || reported.set(true)));
        assert!(!reported.get());
    }

    #[test]
    fn containing_costs_a_task_next_to_nothing() {
        let inner = async {
            let buffer = [0u8; 300];
            futures_lite::future::yield_now().await;
            std::hint::black_box(buffer);
        };
        let size = std::mem::size_of_val(&inner);
        let contained = contain(inner, || {});
        assert!(std::mem::size_of_val(&contained) <= size + 16);
    }
}
