//! Fault injection for the end-to-end tests: debug builds panic
//! (`COMET_FAULT_PANIC_<POINT>=<conn_id>`) or stall the thread for good
//! (`COMET_FAULT_STALL_<POINT>=<conn_id>`) at a named point when the environment names the
//! conn_id, so that the panic policy (`panics`), the liveness probe and the watchdog are
//! tested against the real binary. Release builds compile it to nothing.

/// Panics at `point` when `COMET_FAULT_PANIC_<point>` names `conn_id` (debug builds).
#[cfg(debug_assertions)]
pub(crate) fn panic_if_named(point: &str, conn_id: &str) {
    // Read once: the points sit on the push path (one check per recipient), where an
    // environment lookup each time would slow the debug build's delivery tests.
    static NAMED: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let named = NAMED.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(key, value)| {
                let point = key.to_str()?.strip_prefix("COMET_FAULT_PANIC_")?;
                Some((point.to_owned(), value.into_string().ok()?))
            })
            .collect()
    });
    if named.iter().any(|(p, id)| p == point && id == conn_id) {
        panic!("fault injected at {point} for {conn_id:?}");
    }
}

/// Blocks the calling thread for good at `point` when `COMET_FAULT_STALL_<point>` names
/// `conn_id` (debug builds): a stuck shard, for the liveness probe and the watchdog.
#[cfg(debug_assertions)]
pub(crate) fn stall_if_named(point: &str, conn_id: &str) {
    static NAMED: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let named = NAMED.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(key, value)| {
                let point = key.to_str()?.strip_prefix("COMET_FAULT_STALL_")?;
                Some((point.to_owned(), value.into_string().ok()?))
            })
            .collect()
    });
    if named.iter().any(|(p, id)| p == point && id == conn_id) {
        tracing::warn!(point, conn_id = ?conn_id, "fault injected: this thread stalls");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Release builds: no fault points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn stall_if_named(_point: &str, _conn_id: &str) {}

/// Release builds: no fault points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn panic_if_named(_point: &str, _conn_id: &str) {}
