//! The order of presence callbacks across a zero-downtime restart: for a conn_id its
//! predecessor still held at the hand-over, the successor's `online` waits until the
//! predecessor reports that conn_id's `offline` delivered.
//!
//! Without it the two processes deliver independently, and a client closed by the
//! draining predecessor that reconnected at once had its new `online` reach the message
//! server before its old `offline` (48 of 1,000 clients, 773 of 2,000 with a 2 s drain,
//! ended up looking offline while connected).
//!
//! The predecessor tells, over a pipe (`handover.rs`): every conn_id whose `offline` is
//! still to come (`hold`; its shards announce no session from then on), that its presence
//! lanes have delivered everything queued before the hand-over (`lane_ready`, one per
//! lane, after the list), and each `offline` queued since and delivered (`done`). Until the list and every lane are in, the successor delivers nothing (an
//! `offline` queued before the hand-over may still be on its way); after, only a conn_id
//! on the list waits, for its `done`. Nothing waits forever: the pipe closing (the
//! predecessor exited) or a deadline releases everything, in order.
//!
//! This module is the per-lane state machine, with no I/O: time is passed in as `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHashSet};

/// Longest the successor waits for the predecessor's list before delivering anyway.
pub(crate) const LIST_DEADLINE: Duration = Duration::from_secs(10);
/// Longest an `online` waits for its predecessor's `offline` (a stop takes at most its
/// drain window plus the last callbacks; the unit's stop timeout is 30 s).
pub(crate) const HOLD_DEADLINE: Duration = Duration::from_secs(60);

/// What the predecessor says over the hand-over pipe, one JSON object per line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Notice {
    /// The predecessor holds this conn_id.
    Hold(String),
    /// The list is complete; this many lanes will say `lane_ready`.
    Listed(usize),
    /// One of the predecessor's lanes has delivered everything queued before the list.
    LaneReady(usize),
    /// The predecessor delivered (or gave up) this conn_id's `offline`.
    Done(String),
}

impl Notice {
    /// The line that carries it (JSON, so any conn_id is one line).
    pub(crate) fn line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Parses one line; `None` for anything else (ignored).
    pub(crate) fn parse(line: &str) -> Option<Notice> {
        serde_json::from_str(line).ok()
    }
}

/// One presence lane's view of the predecessor.
#[derive(Debug)]
pub(crate) struct Gate<E> {
    open: bool,
    list_deadline: Instant,
    held: AHashMap<String, Instant>,
    // `done` that came before their `hold` (the predecessor's lanes report from the
    // hand-over on, its list is taken just after): such a conn_id is not held.
    done_early: AHashSet<String>,
    // Events waiting for the list, in arrival order.
    backlog: VecDeque<(String, E)>,
    // Events of held conn_ids, in arrival order per conn_id.
    parked: AHashMap<String, VecDeque<E>>,
}

impl<E> Gate<E> {
    /// A lane with nothing to wait for (a fresh start).
    pub(crate) fn open() -> Gate<E> {
        Gate {
            open: true,
            list_deadline: Instant::now(),
            held: AHashMap::new(),
            done_early: AHashSet::new(),
            backlog: VecDeque::new(),
            parked: AHashMap::new(),
        }
    }

    /// A lane of a successor: closed until the predecessor's list is in.
    pub(crate) fn waiting_for_predecessor(now: Instant) -> Gate<E> {
        Gate {
            open: false,
            list_deadline: now + LIST_DEADLINE,
            ..Gate::open()
        }
    }

    /// An event for `conn_id`: what may be delivered now, in order.
    pub(crate) fn event(&mut self, conn_id: &str, event: E) -> Vec<E> {
        if !self.open {
            self.backlog.push_back((conn_id.to_owned(), event));
            return Vec::new();
        }
        if let Some(parked) = self.parked.get_mut(conn_id) {
            parked.push_back(event);
            return Vec::new();
        }
        if self.held.contains_key(conn_id) {
            self.parked
                .entry(conn_id.to_owned())
                .or_default()
                .push_back(event);
            return Vec::new();
        }
        vec![event]
    }

    /// The predecessor holds `conn_id`.
    pub(crate) fn hold(&mut self, conn_id: String, now: Instant) {
        if !self.done_early.remove(&conn_id) {
            self.held.insert(conn_id, now + HOLD_DEADLINE);
        }
    }

    /// The list and every lane are in: deliver what waited, except held conn_ids.
    pub(crate) fn open_now(&mut self) -> Vec<E> {
        self.open = true;
        self.done_early.clear();
        let backlog = std::mem::take(&mut self.backlog);
        backlog
            .into_iter()
            .flat_map(|(conn_id, event)| self.event(&conn_id, event))
            .collect()
    }

    /// The predecessor delivered `conn_id`'s `offline`: its events go, in order.
    pub(crate) fn done(&mut self, conn_id: &str) -> Vec<E> {
        if self.held.remove(conn_id).is_none() && !self.open {
            self.done_early.insert(conn_id.to_owned());
        }
        self.parked
            .remove(conn_id)
            .map(Vec::from)
            .unwrap_or_default()
    }

    /// The predecessor is gone: nothing is held any more.
    pub(crate) fn release_all(&mut self) -> Vec<E> {
        let mut out = self.open_now();
        self.held.clear();
        for (_, parked) in self.parked.drain() {
            out.extend(parked);
        }
        out
    }

    /// Applies the deadlines: the list's, and each hold's.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<E> {
        let mut out = Vec::new();
        if !self.open && now >= self.list_deadline {
            out.extend(self.open_now());
        }
        let expired: Vec<String> = self
            .held
            .iter()
            .filter(|(_, deadline)| now >= **deadline)
            .map(|(conn_id, _)| conn_id.clone())
            .collect();
        for conn_id in expired {
            out.extend(self.done(&conn_id));
        }
        out
    }

    /// Whether anything waits (the lane then needs its ticks).
    pub(crate) fn is_waiting(&self) -> bool {
        !self.open || !self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_lane_delivers_at_once() {
        let mut gate = Gate::open();
        assert_eq!(gate.event("a", 1), vec![1]);
        assert!(!gate.is_waiting());
    }

    #[test]
    fn nothing_goes_before_the_list_then_only_held_ids_wait() {
        let now = Instant::now();
        let mut gate = Gate::waiting_for_predecessor(now);
        assert!(gate.event("a", "online a").is_empty());
        assert!(gate.event("b", "online b").is_empty());
        gate.hold("a".into(), now);
        assert_eq!(gate.open_now(), vec!["online b"]);
        assert!(gate.event("a", "offline a").is_empty());
        assert_eq!(gate.event("c", "online c"), vec!["online c"]);
        assert_eq!(gate.done("a"), vec!["online a", "offline a"]);
        assert_eq!(gate.event("a", "online a again"), vec!["online a again"]);
        assert!(!gate.is_waiting());
    }

    #[test]
    fn a_done_before_its_hold_means_the_id_is_not_held() {
        let now = Instant::now();
        let mut gate = Gate::waiting_for_predecessor(now);
        assert!(gate.done("a").is_empty());
        gate.hold("a".into(), now);
        gate.hold("b".into(), now);
        assert!(gate.event("a", 1).is_empty());
        assert_eq!(gate.open_now(), vec![1]);
        assert!(gate.event("b", 2).is_empty(), "b is still held");
    }

    #[test]
    fn deadlines_release_in_order() {
        let now = Instant::now();
        let mut gate = Gate::waiting_for_predecessor(now);
        assert!(gate.event("a", 1).is_empty());
        assert!(gate.tick(now + Duration::from_secs(1)).is_empty());
        assert_eq!(gate.tick(now + LIST_DEADLINE), vec![1]);
        gate.hold("b".into(), now);
        assert!(gate.event("b", 2).is_empty());
        assert!(gate.event("b", 3).is_empty());
        assert_eq!(gate.tick(now + HOLD_DEADLINE), vec![2, 3]);
    }

    #[test]
    fn a_predecessor_that_exits_releases_everything() {
        let now = Instant::now();
        let mut gate = Gate::waiting_for_predecessor(now);
        gate.hold("a".into(), now);
        assert!(gate.event("a", 1).is_empty());
        assert!(gate.event("b", 2).is_empty());
        let mut released = gate.release_all();
        released.sort();
        assert_eq!(released, vec![1, 2]);
        assert!(!gate.is_waiting());
    }

    #[test]
    fn notices_are_one_line_whatever_the_conn_id() {
        for notice in [
            Notice::Hold("a\nb\"c".into()),
            Notice::Listed(4),
            Notice::LaneReady(2),
            Notice::Done("é".into()),
        ] {
            let line = notice.line();
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            assert_eq!(Notice::parse(line.trim_end()), Some(notice));
        }
        assert_eq!(Notice::parse("garbage"), None);
    }
}
