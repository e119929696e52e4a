//! A clock shared by every process on the machine (CLOCK_MONOTONIC), so that a publish
//! time stamped by the orchestrator can be compared with a receive time in a worker.

/// Nanoseconds on CLOCK_MONOTONIC.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A message payload carrying its publish time and a sequence number,
/// `t=<ns>;s=<seq>;`, padded to `size` bytes.
pub fn stamped(size: usize, seq: u64) -> String {
    let mut msg = format!("t={};s={seq};", now_ns());
    while msg.len() < size {
        msg.push('.');
    }
    msg
}

/// The publish time in a payload made by [`stamped`] (possibly `\n`-joined).
pub fn publish_ns(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix("t=")?;
    rest.split(';').next()?.parse().ok()
}
