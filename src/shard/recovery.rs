//! What a shard needs from the process for recovery (docs/PROTOCOL.md, "Recovery"): the
//! node's epoch and its share of the buffer bounds. The buffers themselves are
//! `crate::recovery`'s, held by the session table.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use crate::config::Config;
use crate::recovery::Limits;

/// The node's epoch: 16 hex digits, the same on every shard, different in every process
/// (a restarted node, or a successor after a hand-over, numbers afresh and says so).
pub(crate) fn epoch() -> &'static str {
    static EPOCH: OnceLock<String> = OnceLock::new();
    EPOCH.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mixed = nanos ^ (u64::from(std::process::id()) << 40);
        format!("{mixed:016x}")
    })
}

/// One shard's bounds: the per-conn_id ones as configured, and an even share of the
/// node's total (shards share nothing, so each enforces its own part); and the process's
/// seq floor, the one thing of recovery the shards share (an atomic, never waited on).
pub(crate) fn limits(config: &Config) -> Limits {
    static SEQ_FLOOR: AtomicU64 = AtomicU64::new(0);
    Limits {
        seq_floor: &SEQ_FLOOR,
        window: config.recovery_window,
        ttl: config.recovery_ttl,
        bytes: config.recovery_bytes,
        total_bytes: config.recovery_total_bytes / config.max_proc.max(1),
    }
}
