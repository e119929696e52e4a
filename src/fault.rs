//! Fault injection for the end-to-end tests: debug builds panic at a named point when
//! the environment names the conn_id (`COMET_FAULT_PANIC_<POINT>=<conn_id>`), so that the
//! panic policy (`panics`) is tested against the real binary. Release builds compile it
//! to nothing.

/// Panics at `point` when `COMET_FAULT_PANIC_<point>` names `conn_id` (debug builds).
#[cfg(debug_assertions)]
pub fn panic_if_named(point: &str, conn_id: &str) {
    let named = std::env::var_os(format!("COMET_FAULT_PANIC_{point}"));
    if named.is_some_and(|named| named == conn_id) {
        panic!("fault injected at {point} for {conn_id:?}");
    }
}

/// Release builds: no fault points.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn panic_if_named(_point: &str, _conn_id: &str) {}
