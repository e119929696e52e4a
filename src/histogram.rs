//! A latency histogram with fixed buckets, lock-free so that any thread may record into
//! it and the control thread may read it for `/metrics` at any time.
//!
//! Owns its counts only; knows nothing of what it measures or how it is exposed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket upper bounds in microseconds: 100 µs to 10 s, about three per decade, enough
/// to tell a 0.3 ms push from a 3 ms one and a 10 ms callback from a 1 s one.
pub(crate) const BOUNDS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Counts of observations per bucket, their sum and their number.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    /// `buckets[i]` counts observations at most `BOUNDS_US[i]` (and above the bound
    /// before); the last counts the rest.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A snapshot, cumulative as Prometheus wants it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub(crate) struct Snapshot {
    /// `(upper bound in seconds, observations at most that)`, ending with `+Inf`.
    pub(crate) cumulative: Vec<(f64, u64)>,
    pub(crate) count: u64,
    pub(crate) sum_seconds: f64,
}

impl Histogram {
    pub(crate) fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut running = 0;
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        for (i, bucket) in self.buckets.iter().enumerate() {
            running += bucket.load(Ordering::Relaxed);
            let bound = BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            cumulative.push((bound, running));
        }
        Snapshot {
            cumulative,
            count: running,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_micros(101));
        histogram.observe(Duration::from_secs(60));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 3);
        assert_eq!(snapshot.cumulative[0], (0.0001, 1));
        assert_eq!(snapshot.cumulative[1], (0.00025, 2));
        assert_eq!(snapshot.cumulative[BOUNDS_US.len() - 1].1, 2);
        assert_eq!(*snapshot.cumulative.last().unwrap(), (f64::INFINITY, 3));
        assert!((snapshot.sum_seconds - 60.000201).abs() < 1e-9);
    }
}
