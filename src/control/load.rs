//! Load self-check (the original's TODO): decides from sampled load whether the node is
//! overloaded (soft: advertise it so routers send new clients elsewhere) or saturated
//! (hard: refuse new handshakes with 503), each with hysteresis.
//!
//! Pure state machine; the control thread samples and applies it. A state switches on
//! when any configured figure reaches its threshold and off only when every figure is
//! below [`CLEAR_RATIO`] of its threshold, so a node hovering at a limit does not flap.
//!
//! The hard connection bound is the exception: the shards check it per handshake
//! against an exact count (`transport::admission::ClientCounts`), since a sample taken
//! once per `load_check_interval` let a burst of 150 through a bound of 200 with 150
//! connected. Here it only reports: a sample at the bound is `refusing` (and overloaded)
//! without hysteresis, and the shards' flag ([`LoadState::refuse_by_sample`]) is the
//! sampled figures' alone, so that a node just under its bound admits exactly up to it.

use crate::config::OverloadThresholds;

/// Fraction of a threshold a figure must fall below for the state to clear.
pub(crate) const CLEAR_RATIO: f64 = 0.9;

/// One sample of the node's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct LoadSample {
    /// Connected clients.
    pub(crate) connections: u64,
    /// Resident memory, bytes.
    pub(crate) rss: u64,
    /// Messages waiting in outbound queues.
    pub(crate) queued: u64,
}

/// The current verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct LoadState {
    /// Advertised in etcd as `overloaded: true`.
    pub(crate) overloaded: bool,
    /// New handshakes are refused with 503 (by a sampled figure, or at the connection
    /// bound).
    pub(crate) refusing: bool,
    /// Refusing by the sampled figures (RSS, queued messages): the shards' flag.
    #[serde(skip)]
    pub(crate) refuse_by_sample: bool,
}

/// Applies thresholds with hysteresis.
#[derive(Debug, Default)]
pub(crate) struct LoadCheck {
    thresholds: OverloadThresholds,
    state: LoadState,
}

impl LoadCheck {
    /// A check that starts in the normal state.
    pub(crate) fn new(thresholds: OverloadThresholds) -> LoadCheck {
        LoadCheck {
            thresholds,
            state: LoadState::default(),
        }
    }

    /// Folds in a sample; returns the (possibly changed) state.
    pub(crate) fn update(&mut self, sample: LoadSample) -> LoadState {
        let t = &self.thresholds;
        let hard = [(sample.rss, t.hard_rss), (sample.queued, t.hard_queued)];
        let at_bound = t
            .hard_connections
            .is_some_and(|bound| sample.connections >= bound);
        let soft = [
            (sample.connections, t.soft_connections),
            (sample.rss, t.soft_rss),
            (sample.queued, t.soft_queued),
        ];
        self.state.refuse_by_sample = next(self.state.refuse_by_sample, &hard);
        self.state.refusing = self.state.refuse_by_sample || at_bound;
        // Refusing new clients and advertising capacity at once would be a lie.
        self.state.overloaded = next(self.state.overloaded, &soft) || self.state.refusing;
        self.state
    }

    /// The current state.
    pub(crate) fn state(&self) -> LoadState {
        self.state
    }
}

fn next(active: bool, figures: &[(u64, Option<u64>)]) -> bool {
    let reached = figures
        .iter()
        .any(|(value, limit)| limit.is_some_and(|limit| *value >= limit));
    let all_clear = figures.iter().all(|(value, limit)| {
        limit.is_none_or(|limit| (*value as f64) < limit as f64 * CLEAR_RATIO)
    });
    if active { !all_clear } else { reached }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> LoadCheck {
        LoadCheck::new(OverloadThresholds {
            soft_connections: Some(100),
            hard_connections: Some(200),
            soft_queued: Some(1000),
            ..OverloadThresholds::default()
        })
    }

    fn conns(n: u64) -> LoadSample {
        LoadSample {
            connections: n,
            ..LoadSample::default()
        }
    }

    #[test]
    fn soft_threshold_sets_overloaded_and_clears_with_hysteresis() {
        let mut check = check();
        assert!(!check.update(conns(99)).overloaded);
        assert!(check.update(conns(100)).overloaded);
        assert!(
            check.update(conns(95)).overloaded,
            "within the hysteresis band"
        );
        assert!(!check.update(conns(89)).overloaded);
    }

    #[test]
    fn hard_threshold_refuses_and_implies_overloaded() {
        let mut check = LoadCheck::new(OverloadThresholds {
            hard_queued: Some(1000),
            ..OverloadThresholds::default()
        });
        let queued = |n| LoadSample {
            queued: n,
            ..LoadSample::default()
        };
        let state = check.update(queued(1000));
        assert!(state.refusing && state.refuse_by_sample && state.overloaded);
        let state = check.update(queued(950));
        assert!(
            state.refuse_by_sample,
            "still within 90% of the hard threshold"
        );
        let state = check.update(queued(800));
        assert!(!state.refusing && !state.overloaded);
    }

    #[test]
    fn connection_bound_reports_without_hysteresis_and_leaves_the_flag_alone() {
        let mut check = check();
        let state = check.update(conns(200));
        assert!(state.refusing && state.overloaded);
        assert!(
            !state.refuse_by_sample,
            "the shards check the bound exactly"
        );
        let state = check.update(conns(199));
        assert!(!state.refusing, "one place free: admitted");
        assert!(state.overloaded, "soft threshold of 100 still passed");
    }

    #[test]
    fn any_figure_trips_and_all_must_clear() {
        let mut check = check();
        let busy = LoadSample {
            connections: 10,
            queued: 1000,
            ..LoadSample::default()
        };
        assert!(check.update(busy).overloaded);
        let still = LoadSample {
            connections: 95,
            queued: 0,
            ..LoadSample::default()
        };
        assert!(
            check.update(still).overloaded,
            "connections within the band keep it"
        );
    }

    #[test]
    fn no_thresholds_never_overloaded() {
        let mut check = LoadCheck::new(OverloadThresholds::default());
        let state = check.update(LoadSample {
            connections: u64::MAX,
            rss: u64::MAX,
            queued: u64::MAX,
        });
        assert_eq!(state, LoadState::default());
    }
}
