//! Logging that never blocks the thread that logs.
//!
//! Shards log from their own threads, and stderr may be a pipe to journald or a container
//! log driver that falls behind: a shard writing to it directly stalled once the pipe's
//! 64 KiB were full (handshakes stopped, a push to 10 clients reached only those on the
//! other shard). Here each event is formatted into its own buffer and handed to one writer
//! thread through a bounded queue: at most `log_queue_bytes` wait; past that an event is
//! dropped and counted, and the writer says how many were dropped once it can write again.
//!
//! Owns the writer thread and the counters; knows nothing of what is logged.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// Longest wait at exit for the queued lines to be written.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

static QUEUED: AtomicUsize = AtomicUsize::new(0);
static LIMIT: AtomicUsize = AtomicUsize::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static SENDER: OnceLock<Sender<Vec<u8>>> = OnceLock::new();

/// Log lines dropped since start because the log reader fell behind.
pub(crate) fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The `MakeWriter` for tracing-subscriber: every event goes through the queue.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueuedStderr;

/// One event being formatted; queued (or dropped) when tracing is done with it.
pub struct EventBuffer(Vec<u8>);

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedStderr {
    type Writer = EventBuffer;

    fn make_writer(&'a self) -> EventBuffer {
        EventBuffer(Vec::with_capacity(256))
    }
}

impl Write for EventBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        let line = std::mem::take(&mut self.0);
        if !line.is_empty() {
            enqueue(line);
        }
    }
}

/// Queues a formatted line without waiting; drops it when the queue is full.
fn enqueue(line: Vec<u8>) {
    let Some(sender) = SENDER.get() else {
        // Before `start` (or in unit tests): nowhere to queue; write it as is.
        let _ = std::io::stderr().write_all(&line);
        return;
    };
    let len = line.len();
    if QUEUED.fetch_add(len, Ordering::Relaxed) + len > LIMIT.load(Ordering::Relaxed)
        || sender.try_send(line).is_err()
    {
        QUEUED.fetch_sub(len, Ordering::Relaxed);
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts the writer thread (once), with at most `queue_bytes` of lines waiting; the
/// returned guard waits, on drop, up to a second for what is queued to be written.
pub fn start(queue_bytes: usize) -> FlushOnDrop {
    LIMIT.store(queue_bytes, Ordering::Relaxed);
    // Unbounded in count, bounded in bytes by `LIMIT` in `enqueue`.
    let (sender, receiver) = crossbeam_channel::unbounded();
    if SENDER.set(sender).is_ok() {
        let _ = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(receiver, std::io::stderr()));
    }
    FlushOnDrop
}

/// The writer thread: the only place that waits on stderr.
fn write_lines(lines: Receiver<Vec<u8>>, mut out: impl Write) {
    let mut reported = 0;
    while let Ok(line) = lines.recv() {
        let dropped = DROPPED.load(Ordering::Relaxed);
        if dropped > reported {
            let note = format!(
                "comet: {} log lines dropped: the log reader is not keeping up\n",
                dropped - reported
            );
            let _ = out.write_all(note.as_bytes());
            reported = dropped;
        }
        let _ = out.write_all(&line);
        QUEUED.fetch_sub(line.len(), Ordering::Relaxed);
    }
}

/// Waits (bounded) for the queue to empty when dropped: the last lines before exit.
pub struct FlushOnDrop;

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        flush(FLUSH_AT_EXIT);
    }
}

/// Waits up to `limit` for the queued lines to be written (before an exit or abort).
pub(crate) fn flush(limit: Duration) {
    let deadline = Instant::now() + limit;
    while QUEUED.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Counts repeated events (connections refused at a bound, say) so that they are logged
/// at most once per interval, each line saying how many there were since the last one: a
/// stranger opening connections as fast as it can must not flood the log.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl Throttle {
    /// Counts one event; `Some(count)` when a line is due now (the events since the last).
    pub(crate) fn note(&mut self, interval: Duration, now: Instant) -> Option<u64> {
        self.since_logged += 1;
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < interval)
        {
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.since_logged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_logs_the_first_event_then_once_per_interval_with_the_count() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        let interval = Duration::from_secs(10);
        assert_eq!(throttle.note(interval, start), Some(1));
        for _ in 0..5 {
            assert_eq!(
                throttle.note(interval, start + Duration::from_secs(1)),
                None
            );
        }
        assert_eq!(throttle.note(interval, start + interval), Some(6));
    }

    #[test]
    fn the_writer_reports_drops_before_the_next_line() {
        let (sender, receiver) = crossbeam_channel::unbounded();
        DROPPED.fetch_add(3, Ordering::Relaxed);
        let written = std::thread::spawn(move || {
            let mut out = Vec::new();
            write_lines(receiver, &mut out);
            out
        });
        QUEUED.fetch_add(5, Ordering::Relaxed);
        sender.send(b"line\n".to_vec()).unwrap();
        drop(sender);
        let out = String::from_utf8(written.join().unwrap()).unwrap();
        assert!(out.contains("log lines dropped"), "{out}");
        assert!(out.ends_with("line\n"), "{out}");
    }
}
