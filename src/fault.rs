//! Fault injection for the end-to-end tests: debug builds panic
//! (`COMET_FAULT_PANIC_<POINT>=<conn_id>`) or stall the thread for good
//! (`COMET_FAULT_STALL_<POINT>=<conn_id>`) at a named point when the environment names the
//! conn_id, so that the panic policy (`panics`), the liveness probe and the watchdog are
//! tested against the real binary. Release builds compile it to nothing.

/// Whether the environment names `conn_id` at `point` for `kind`
/// (`COMET_FAULT_<KIND>_<POINT>=<conn_id>`). The variables are read once: the points sit on the push path (one
/// check per recipient), where an environment lookup each time would slow the debug
/// build's delivery tests.
#[cfg(debug_assertions)]
fn is_named(kind: &str, point: &str, conn_id: &str) -> bool {
    static NAMED: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
    let named = NAMED.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(key, value)| {
                let kind_and_point = key.to_str()?.strip_prefix("COMET_FAULT_")?;
                Some((kind_and_point.to_owned(), value.into_string().ok()?))
            })
            .collect()
    });
    named.iter().any(|(name, id)| {
        id == conn_id
            && name
                .strip_prefix(kind)
                .and_then(|rest| rest.strip_prefix('_'))
                == Some(point)
    })
}

/// Panics at `point` when `COMET_FAULT_PANIC_<point>` names `conn_id` (debug builds).
#[cfg(debug_assertions)]
pub(crate) fn panic_if_named(point: &str, conn_id: &str) {
    if is_named("PANIC", point, conn_id) {
        panic!("fault injected at {point} for {conn_id:?}");
    }
}

/// Blocks the calling thread for good at `point` when `COMET_FAULT_STALL_<point>` names
/// `conn_id` (debug builds): a stuck shard, for the liveness probe and the watchdog.
#[cfg(debug_assertions)]
pub(crate) fn stall_if_named(point: &str, conn_id: &str) {
    if is_named("STALL", point, conn_id) {
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
