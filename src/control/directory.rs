//! The node-wide conn_id directory: which shard holds each connected conn_id.
//!
//! Owned by the control thread alone (no lock): shards ask it to claim a conn_id before
//! they upgrade a client and tell it when the client is gone; the push RPC reads it to
//! split recipients per shard. It is the only place a duplicate conn_id across shards can
//! be seen. Pure state machine: no I/O, no channels beyond the opaque waiter it stores.
//!
//! A conn_id whose client is gone but whose recovery buffer is kept is *parked*: pushes
//! are still routed to the shard holding the buffer, but it is not a connection (not
//! counted, not listed) and a new claim for it is granted, naming the shard the buffer
//! is on. It leaves when that shard says the buffer expired.

use ahash::AHashMap;

use crate::config::DuplicatePolicy;

/// What the directory decided about a claim.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim<W> {
    /// The conn_id is the claimant's (its waiter is handed back to be answered).
    Granted(W),
    /// The conn_id is connected elsewhere on this node (reject policy).
    Refused(W),
    /// The conn_id was parked (a recovery buffer is kept for it) on shard `from`, another
    /// than the claimant's: it is the claimant's now, and the buffer must follow it.
    Moved {
        /// The claimant's waiter.
        waiter: W,
        /// The shard holding the parked buffer.
        from: usize,
    },
    /// Replace policy: the holder on `shard` must be kicked; the claimant waits.
    KickHolder {
        /// Shard holding the conn_id now.
        shard: usize,
        /// A claimant that was waiting before and has now been superseded.
        superseded: Option<W>,
    },
}

struct Entry<W> {
    shard: usize,
    waiting: Option<(usize, W)>,
    /// No client holds it; the shard keeps its recovery buffer.
    parked: bool,
}

/// conn_id -> shard, with per-shard counts.
pub(crate) struct Directory<W> {
    entries: AHashMap<String, Entry<W>>,
    per_shard: Vec<usize>,
    connected: usize,
    policy: DuplicatePolicy,
}

impl<W> Directory<W> {
    /// An empty directory for `shards` shards.
    pub(crate) fn new(shards: usize, policy: DuplicatePolicy) -> Directory<W> {
        Directory {
            entries: AHashMap::new(),
            per_shard: vec![0; shards],
            connected: 0,
            policy,
        }
    }

    /// `shard` wants `conn_id` for a client it is about to upgrade. Under the replace
    /// policy `waiter` is kept until the holder is released.
    pub(crate) fn claim(&mut self, conn_id: &str, shard: usize, waiter: W) -> Claim<W> {
        let Some(entry) = self.entries.get_mut(conn_id) else {
            self.entries.insert(
                conn_id.to_owned(),
                Entry {
                    shard,
                    waiting: None,
                    parked: false,
                },
            );
            self.per_shard[shard] += 1;
            self.connected += 1;
            return Claim::Granted(waiter);
        };
        if entry.parked {
            let from = entry.shard;
            entry.parked = false;
            entry.shard = shard;
            self.per_shard[shard] += 1;
            self.connected += 1;
            return if from == shard {
                Claim::Granted(waiter)
            } else {
                Claim::Moved { waiter, from }
            };
        }
        match self.policy {
            DuplicatePolicy::Reject => Claim::Refused(waiter),
            DuplicatePolicy::Replace => {
                let superseded = entry.waiting.replace((shard, waiter)).map(|(_, w)| w);
                Claim::KickHolder {
                    shard: entry.shard,
                    superseded,
                }
            }
        }
    }

    /// `shard` no longer holds `conn_id` (with `parked`: it keeps its recovery buffer).
    /// Returns the claimant that now owns it, if one was waiting: the caller tells it
    /// `Granted` (or releases again if it is gone).
    pub(crate) fn release(
        &mut self,
        conn_id: &str,
        shard: usize,
        parked: bool,
    ) -> Option<(usize, W)> {
        let entry = self.entries.get_mut(conn_id)?;
        if entry.shard != shard || entry.parked {
            return None;
        }
        self.per_shard[shard] -= 1;
        self.connected -= 1;
        match entry.waiting.take() {
            Some((next_shard, waiter)) => {
                entry.shard = next_shard;
                self.per_shard[next_shard] += 1;
                self.connected += 1;
                Some((next_shard, waiter))
            }
            None if parked => {
                entry.parked = true;
                None
            }
            None => {
                self.entries.remove(conn_id);
                None
            }
        }
    }

    /// `shard` dropped the parked buffer of `conn_id` (its TTL passed): forgotten, unless
    /// a client claimed it since.
    pub(crate) fn expired(&mut self, conn_id: &str, shard: usize) {
        if self
            .entries
            .get(conn_id)
            .is_some_and(|e| e.parked && e.shard == shard)
        {
            self.entries.remove(conn_id);
        }
    }

    /// The shard holding `conn_id`, or its parked recovery buffer.
    pub(crate) fn shard_of(&self, conn_id: &str) -> Option<usize> {
        self.entries.get(conn_id).map(|e| e.shard)
    }

    /// The fan-out of a push: `conn_ids` (each once, in the order first named) split by
    /// the shard holding them (`per_shard[shard]`), and those on no shard here.
    pub(crate) fn split_by_shard(&self, conn_ids: &[String]) -> Split {
        let mut split = Split {
            per_shard: vec![Vec::new(); self.per_shard.len()],
            missing: Vec::new(),
        };
        // A single recipient (the everyday unicast) needs no duplicate check, nor its
        // allocation.
        let mut seen = ahash::AHashSet::with_capacity(if conn_ids.len() > 1 {
            conn_ids.len()
        } else {
            0
        });
        for id in conn_ids
            .iter()
            .filter(|id| conn_ids.len() == 1 || seen.insert(id.as_str()))
        {
            match self.shard_of(id) {
                Some(shard) => split.per_shard[shard].push(id.clone()),
                None => split.missing.push(id.clone()),
            }
        }
        split
    }

    /// Whether a client holds `conn_id` here (a parked one is not connected).
    pub(crate) fn is_connected(&self, conn_id: &str) -> bool {
        self.entries.get(conn_id).is_some_and(|e| !e.parked)
    }

    /// Every conn_id connected to this node (not the parked ones).
    pub(crate) fn conn_ids(&self) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.parked)
            .map(|(id, _)| id.as_str())
    }

    /// Connections per shard.
    pub(crate) fn per_shard(&self) -> &[usize] {
        &self.per_shard
    }

    /// Connections on this node.
    pub(crate) fn len(&self) -> usize {
        self.connected
    }
}

/// A push's recipients split by shard ([`Directory::split_by_shard`]).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Split {
    /// The ids each shard holds, indexed by shard.
    pub(crate) per_shard: Vec<Vec<String>>,
    /// The ids no shard here holds.
    pub(crate) missing: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_push_splits_by_holder_once_per_id_in_order() {
        let mut dir = Directory::new(3, DuplicatePolicy::Reject);
        for (id, shard) in [("a", 0), ("b", 2), ("c", 0), ("p", 1)] {
            assert_eq!(dir.claim(id, shard, ()), Claim::Granted(()));
        }
        assert!(dir.release("p", 1, true).is_none());
        let split = dir.split_by_shard(&ids(&["c", "x", "a", "b", "c", "p", "x", "y"]));
        assert_eq!(
            split,
            Split {
                per_shard: vec![ids(&["c", "a"]), ids(&["p"]), ids(&["b"])],
                missing: ids(&["x", "y"]),
            },
            "duplicates named once; a parked id goes to its buffer's shard"
        );
        assert_eq!(
            dir.split_by_shard(&[]).per_shard,
            vec![Vec::<String>::new(); 3]
        );
    }

    #[test]
    fn reject_policy_refuses_a_second_claim_on_any_shard() {
        let mut dir = Directory::new(2, DuplicatePolicy::Reject);
        assert_eq!(dir.claim("a", 0, ()), Claim::Granted(()));
        assert_eq!(dir.claim("a", 1, ()), Claim::Refused(()));
        assert_eq!(dir.per_shard(), &[1, 0]);
        assert!(dir.release("a", 0, false).is_none());
        assert_eq!(dir.claim("a", 1, ()), Claim::Granted(()));
        assert_eq!(dir.per_shard(), &[0, 1]);
    }

    #[test]
    fn replace_policy_hands_over_on_release() {
        let mut dir = Directory::new(2, DuplicatePolicy::Replace);
        assert_eq!(dir.claim("a", 0, "old"), Claim::Granted("old"));
        assert_eq!(
            dir.claim("a", 1, "new"),
            Claim::KickHolder {
                shard: 0,
                superseded: None
            }
        );
        assert_eq!(dir.release("a", 0, false), Some((1, "new")));
        assert_eq!(dir.shard_of("a"), Some(1));
        assert_eq!(dir.per_shard(), &[0, 1]);
    }

    #[test]
    fn a_newer_claimant_supersedes_a_waiting_one() {
        let mut dir = Directory::new(1, DuplicatePolicy::Replace);
        dir.claim("a", 0, 1);
        dir.claim("a", 0, 2);
        assert_eq!(
            dir.claim("a", 0, 3),
            Claim::KickHolder {
                shard: 0,
                superseded: Some(2)
            }
        );
    }

    #[test]
    fn release_by_a_shard_that_does_not_hold_it_is_ignored() {
        let mut dir: Directory<()> = Directory::new(2, DuplicatePolicy::Reject);
        dir.claim("a", 0, ());
        assert!(dir.release("a", 1, false).is_none());
        assert_eq!(dir.len(), 1);
    }

    #[test]
    fn a_parked_conn_id_routes_to_its_buffer_until_claimed_or_expired() {
        let mut dir: Directory<()> = Directory::new(2, DuplicatePolicy::Reject);
        dir.claim("a", 0, ());
        assert!(dir.release("a", 0, true).is_none());
        assert_eq!(dir.shard_of("a"), Some(0), "pushes go to the buffer");
        assert!(!dir.is_connected("a"));
        assert_eq!((dir.len(), dir.per_shard()), (0, &[0, 0][..]));
        assert_eq!(dir.conn_ids().count(), 0);
        // Reclaimed on the same shard: granted there, a connection again.
        assert_eq!(dir.claim("a", 0, ()), Claim::Granted(()));
        assert_eq!((dir.len(), dir.per_shard()), (1, &[1, 0][..]));
        dir.release("a", 0, true);
        // On another shard: the buffer must move.
        assert_eq!(
            dir.claim("a", 1, ()),
            Claim::Moved {
                waiter: (),
                from: 0
            }
        );
        assert_eq!(dir.shard_of("a"), Some(1));
        // The old shard's late expiry does not forget the new holder.
        dir.expired("a", 0);
        assert_eq!(dir.shard_of("a"), Some(1));
        dir.release("a", 1, true);
        dir.expired("a", 0);
        assert_eq!(dir.shard_of("a"), Some(1));
        dir.expired("a", 1);
        assert_eq!(dir.shard_of("a"), None);
    }

    #[test]
    fn a_parked_conn_id_is_not_a_duplicate() {
        let mut dir: Directory<()> = Directory::new(1, DuplicatePolicy::Reject);
        dir.claim("a", 0, ());
        dir.release("a", 0, true);
        assert_eq!(dir.claim("a", 0, ()), Claim::Granted(()));
        assert_eq!(dir.claim("a", 0, ()), Claim::Refused(()));
    }
}
