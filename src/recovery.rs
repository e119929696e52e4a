//! Recovery buffers: the last pushes to each conn_id that opted in (`"recover": true`),
//! kept so that a client reconnecting with `"since": {"epoch","seq"}` gets what it missed,
//! in order, exactly once (docs/PROTOCOL.md, "Recovery").
//!
//! One [`RecoveryStore`] per shard, owned by its session table: shards share nothing, so
//! the node's `recovery_total_bytes` is split evenly between them. Per conn_id a ring of
//! `(seq, message)` (the message is the push's shared `Arc`, never a copy), bounded by
//! `recovery_window` messages and `recovery_bytes`; across the shard the oldest entries go
//! first once the shard's share of the total is reached. A ring whose client is gone is
//! *parked* for `recovery_ttl` and keeps taking pushes; [`RecoveryStore::sweep`] drops it
//! after that.
//!
//! Pure: no I/O, no clock (time comes in as `now`), no channels. It never delivers
//! anything itself: the table frames and hands on what [`RecoveryStore::record`] numbers
//! and what [`RecoveryStore::attach`] gives back to replay.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ahash::AHashMap;

use crate::codec::Message;

/// Bytes counted for each kept message besides its payload: the message's own
/// allocation (the `Arc`, its lazily encoded forms), the payload's allocator rounding, the
/// ring slot and the shard's age-order slot (each in a deque that grows by doubling), so
/// that the bounds hold for what the process really holds, tiny pushes included.
/// Measured: 100,000 pushes of 100 bytes to absent clients grew the node's RSS by
/// 30,460 KiB, 311 bytes per message, so 211 besides the payload.
pub(crate) const ENTRY_OVERHEAD: usize = 224;

/// Parked rings looked at, oldest first, for one without messages to evict: a bound on
/// the work per eviction, whatever the number of rings.
const EMPTY_SCAN: usize = 64;

/// Bytes counted for each ring besides its conn_id (counted twice, see [`ring_cost`]),
/// kept or parked, with or without messages: its slot in the shard's map (key and
/// [`Ring`], with the map's spare capacity), the conn_id's own allocation, its expiry
/// slot, and the control thread's directory entry of a parked conn_id. Without it a
/// stranger could park rings without limit: one connect and close with `"recover": true`
/// per conn_id, no push needed, and none of it was counted against
/// `recovery_total_bytes`. Measured: 33,156 parked rings of 250-byte conn_ids grew RSS by
/// 956 bytes each, when 256 + the conn_id (506) was counted; 448 + twice it is 948.
pub(crate) const RING_OVERHEAD: usize = 448;

/// The bounds of one shard's buffers, and the node's seq floor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Messages kept per conn_id; 0: recovery is off.
    pub(crate) window: usize,
    /// How long a parked ring is kept.
    pub(crate) ttl: Duration,
    /// Bytes kept per conn_id (payloads plus [`ENTRY_OVERHEAD`] each).
    pub(crate) bytes: usize,
    /// Bytes kept on this shard, all conn_ids together: messages, and
    /// [`RING_OVERHEAD`] per ring. Past it the oldest message goes first; with no message
    /// left, the oldest parked ring.
    pub(crate) total_bytes: usize,
    /// The highest seq of any buffer this process has dropped (expired, kicked, evicted),
    /// shared by all its shards: a buffer made afresh numbers from above it, so that a
    /// conn_id never sees a seq repeated within an epoch, whichever shard it lands on
    /// (a buffer dropped and made again restarted at 1).
    pub(crate) seq_floor: &'static AtomicU64,
}

/// Where a reconnecting client says it stopped: the epoch and seq of the last message it
/// got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Since {
    /// The epoch of that message.
    pub(crate) epoch: String,
    /// Its seq.
    pub(crate) seq: u64,
}

/// What a client's token object asks of recovery: `"recover": true`, and on a reconnect
/// `"since"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The client opted in.
    pub(crate) recover: bool,
    /// Where it stopped, when reconnecting.
    pub(crate) since: Option<Since>,
}

impl Since {
    /// An event stream's `Last-Event-ID` (`<epoch>:<seq>`, the `id:` of the last event
    /// the client got); `None` if it is not one of ours.
    pub(crate) fn from_last_event_id(value: &[u8]) -> Option<Since> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let (epoch, seq) = text.rsplit_once(':')?;
        if epoch.is_empty()
            || epoch.len() > MAX_EPOCH
            || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return None;
        }
        Some(Since {
            epoch: epoch.to_owned(),
            seq: seq.parse().ok()?,
        })
    }
}

/// Longest epoch a client may name in `since` (ours are 16 characters).
const MAX_EPOCH: usize = 64;

impl Request {
    /// Reads `recover` and `since` from a token object's values (absent: `Null`).
    /// `recover` must be a boolean; `since` an object `{"epoch": string, "seq": u64}`.
    pub(crate) fn from_token(
        recover: &serde_json::Value,
        since: &serde_json::Value,
    ) -> Result<Request, String> {
        use serde_json::Value;
        let recover = match recover {
            Value::Null => false,
            Value::Bool(b) => *b,
            // The kind, not the value: the value is the client's, up to a token's size,
            // and this text goes into the answer and the log.
            other => {
                return Err(format!(
                    "`recover` must be true or false, not {}",
                    crate::codec::json::kind_of(other)
                ));
            }
        };
        let since = match since {
            Value::Null => None,
            Value::Object(fields) => {
                let epoch = fields.get("epoch").and_then(Value::as_str);
                let seq = fields.get("seq").and_then(Value::as_u64);
                match (epoch, seq) {
                    (Some(epoch), Some(seq)) if epoch.len() <= MAX_EPOCH => Some(Since {
                        epoch: epoch.to_owned(),
                        seq,
                    }),
                    _ => {
                        return Err(format!(
                            "`since` must be {{\"epoch\": a string of at most {MAX_EPOCH} bytes, \"seq\": an unsigned integer}}"
                        ));
                    }
                }
            }
            _ => return Err("`since` must be an object".into()),
        };
        Ok(Request { recover, since })
    }
}

/// Why a recovery could not be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Messages after `since` were dropped by a bound (window, bytes, total): `lost` says
    /// which.
    WindowExceeded,
    /// No buffer for this conn_id here: its TTL passed, or it was never on this node.
    Expired,
    /// `since` names another epoch: the node restarted, or the client was on another node.
    Epoch,
    /// `since.seq` is past the last seq this node gave the conn_id.
    UnknownSeq,
}

impl Lost {
    /// The `reason` of the `recovered:false` frame.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Lost::WindowExceeded => "window_exceeded",
            Lost::Expired => "expired",
            Lost::Epoch => "epoch",
            Lost::UnknownSeq => "unknown_seq",
        }
    }
}

/// What a reconnect with `since` gets: the first frame's facts and the messages to replay.
#[derive(Debug)]
pub(crate) struct Resume {
    /// `None`: complete. Otherwise why not, and the seqs known lost (inclusive), if known.
    pub(crate) lost: Option<(Lost, Option<(u64, u64)>)>,
    /// The last seq given to this conn_id (0: none yet).
    pub(crate) seq: u64,
    /// Messages to send before any live one, oldest first.
    pub(crate) replay: Vec<(u64, Arc<Message>)>,
}

impl Resume {
    /// The first frame's JSON text: `{"recovered":true,"epoch":"E","seq":M}`, or
    /// `{"recovered":false,"epoch":"E","seq":M,"reason":"…","lost":[A,B]|null}`.
    pub(crate) fn header(&self, epoch: &str) -> String {
        let epoch = json_string(epoch);
        match self.lost {
            None => format!(r#"{{"recovered":true,"epoch":{epoch},"seq":{}}}"#, self.seq),
            Some((reason, range)) => {
                let lost = range.map_or("null".to_owned(), |(a, b)| format!("[{a},{b}]"));
                format!(
                    r#"{{"recovered":false,"epoch":{epoch},"seq":{},"reason":"{}","lost":{lost}}}"#,
                    self.seq,
                    reason.label()
                )
            }
        }
    }
}

/// A WebSocket message text for a recovering client: `{"seq":N,"epoch":"E","msg":"…"}`.
pub(crate) fn message_text(epoch: &str, seq: u64, payload: &[u8]) -> String {
    format!(
        r#"{{"seq":{seq},"epoch":{},"msg":{}}}"#,
        json_string(epoch),
        json_string(&String::from_utf8_lossy(payload))
    )
}

/// A JSON-lines message line for a recovering client: the plain line's fields plus
/// `seq` and `epoch`.
pub(crate) fn message_line(epoch: &str, seq: u64, payload: &[u8]) -> String {
    format!(
        "{{\"type\":\"message\",\"data\":{},\"seq\":{seq},\"epoch\":{}}}\n",
        json_string(&String::from_utf8_lossy(payload)),
        json_string(epoch)
    )
}

fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn cost(message: &Message) -> usize {
    message.payload().len() + ENTRY_OVERHEAD
}

/// A ring's count: [`RING_OVERHEAD`] and its conn_id twice (the shard's key and the
/// directory's copy on the control thread).
fn ring_cost(conn_id: &str) -> usize {
    RING_OVERHEAD + 2 * conn_id.len()
}

/// One conn_id's buffer. Holds no `Rc`, so it can move to another shard as a [`Parcel`].
#[derive(Debug)]
struct Ring {
    /// The seq the next message gets (seqs start at 1).
    next_seq: u64,
    entries: VecDeque<(u64, Arc<Message>)>,
    bytes: usize,
    /// `Some`: the client is gone and the ring is kept until then.
    parked_until: Option<Instant>,
    /// Made by [`RecoveryStore::expect`] for a ring that never came (it expired on its
    /// shard meanwhile): it holds only pushes made since, and no history.
    orphan: bool,
}

impl Default for Ring {
    fn default() -> Ring {
        Ring {
            next_seq: 1,
            entries: VecDeque::new(),
            bytes: 0,
            parked_until: None,
            orphan: false,
        }
    }
}

impl Ring {
    /// The seq of the oldest message still kept (`next_seq` when none is).
    fn first_kept(&self) -> u64 {
        self.entries.front().map_or(self.next_seq, |(seq, _)| *seq)
    }
}

/// A parked ring on its way to another shard (a reconnect landed there).
#[derive(Debug)]
pub(crate) struct Parcel(Ring);

/// One shard's recovery buffers.
pub(crate) struct RecoveryStore {
    limits: Limits,
    rings: AHashMap<Rc<str>, Ring>,
    /// Every kept entry, oldest first, for the shard's total bound. Entries a ring already
    /// dropped stay until they reach the front or [`RecoveryStore::compact`] runs.
    order: VecDeque<(Rc<str>, u64)>,
    /// Parked rings by expiry, oldest first (the TTL is one for all, so parking order is
    /// expiry order): a sweep looks only at the ones due, never at every ring. An entry
    /// whose ring was reattached or parked again since is skipped when it comes due.
    expiries: VecDeque<(Rc<str>, Instant)>,
    kept: usize,
    bytes: usize,
    /// Parked rings dropped by the total bound since the last [`RecoveryStore::sweep`],
    /// which reports them with the expired ones.
    evicted: Vec<Rc<str>>,
}

/// What a shard's buffers hold.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreFigures {
    pub(crate) rings: usize,
    pub(crate) parked: usize,
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

impl RecoveryStore {
    pub(crate) fn new(limits: Limits) -> RecoveryStore {
        RecoveryStore {
            limits,
            rings: AHashMap::new(),
            order: VecDeque::new(),
            expiries: VecDeque::new(),
            kept: 0,
            bytes: 0,
            evicted: Vec::new(),
        }
    }

    /// A recovering client registers. Without `since` it starts afresh (what an earlier
    /// session left is dropped; seqs go on from where they were, so none repeats within an
    /// epoch) and gets no first frame. With `since` it gets what it missed.
    pub(crate) fn attach(
        &mut self,
        conn_id: &Rc<str>,
        since: Option<&Since>,
        epoch: &str,
    ) -> Option<Resume> {
        let existed = self.rings.contains_key(conn_id);
        let ring = self.ring_for(conn_id);
        ring.parked_until = None;
        let orphan = std::mem::take(&mut ring.orphan);
        let Some(since) = since else {
            self.clear(conn_id);
            self.enforce_total();
            return None;
        };
        let last = ring.next_seq - 1;
        let lost = if orphan {
            // Its seqs started afresh here: what the client had is unknown, but every
            // message kept was pushed after it left.
            return Some(Resume {
                lost: Some((Lost::Expired, None)),
                seq: last,
                replay: ring.entries.iter().cloned().collect(),
            });
        } else if since.epoch != epoch {
            Some((Lost::Epoch, None))
        } else if !existed {
            Some((Lost::Expired, None))
        } else if since.seq > last {
            Some((Lost::UnknownSeq, None))
        } else if since.seq + 1 < ring.first_kept() {
            Some((
                Lost::WindowExceeded,
                Some((since.seq + 1, ring.first_kept() - 1)),
            ))
        } else {
            None
        };
        let replay = match lost {
            None | Some((Lost::WindowExceeded, _)) => ring
                .entries
                .iter()
                .filter(|(seq, _)| *seq > since.seq)
                .cloned()
                .collect(),
            // The client's position means nothing here: replaying would repeat messages.
            Some(_) => Vec::new(),
        };
        if matches!(lost, Some((Lost::Epoch | Lost::UnknownSeq, _))) {
            self.clear(conn_id);
        }
        self.enforce_total();
        Some(Resume {
            lost,
            seq: last,
            replay,
        })
    }

    /// Numbers `message` for `conn_id` (a live recovering client) and keeps it.
    pub(crate) fn record(&mut self, conn_id: &Rc<str>, message: &Arc<Message>) -> u64 {
        let ring = self.ring_for(conn_id);
        let seq = ring.next_seq;
        ring.next_seq += 1;
        self.keep(conn_id, seq, message);
        seq
    }

    /// Keeps `message` for an absent client whose ring is parked and not expired at
    /// `now`; false when there is none, or when the bounds did not let it stay (the push
    /// failed: its seq is known lost at the reconnect).
    pub(crate) fn buffer_if_parked(
        &mut self,
        conn_id: &str,
        message: &Arc<Message>,
        now: Instant,
    ) -> bool {
        let Some((key, ring)) = self.rings.get_key_value(conn_id) else {
            return false;
        };
        if ring.parked_until.is_none_or(|until| until <= now) {
            return false;
        }
        let key = Rc::clone(key);
        let seq = self.record(&key, message);
        self.rings
            .get(&key)
            .is_some_and(|r| r.entries.back().is_some_and(|(kept, _)| *kept == seq))
    }

    /// The client is gone (not kicked): its ring is kept for `recovery_ttl` from `now`.
    pub(crate) fn park(&mut self, conn_id: &str, now: Instant) {
        let until = now + self.limits.ttl;
        if let Some(key) = self.rings.get_key_value(conn_id).map(|(k, _)| Rc::clone(k)) {
            self.set_parked(key, until);
        }
    }

    fn set_parked(&mut self, conn_id: Rc<str>, until: Instant) {
        if let Some(ring) = self.rings.get_mut(&conn_id) {
            ring.parked_until = Some(until);
            self.expiries.push_back((conn_id, until));
            self.compact_expiries();
        }
    }

    /// Keeps the expiry order within twice the rings (plus slack): each park of a ring
    /// leaves its previous entry stale, and one client reconnecting in a loop within the
    /// TTL would otherwise pile up an entry (and its conn_id) per reconnect, counted
    /// against no bound.
    fn compact_expiries(&mut self) {
        if self.expiries.len() <= 2 * self.rings.len() + 64 {
            return;
        }
        let rings = &self.rings;
        self.expiries.retain(|(id, until)| {
            rings
                .get(id)
                .is_some_and(|r| r.parked_until == Some(*until))
        });
    }

    /// Whether a parked ring for `conn_id` is kept at `now`.
    pub(crate) fn is_parked(&self, conn_id: &str, now: Instant) -> bool {
        self.rings
            .get(conn_id)
            .and_then(|ring| ring.parked_until)
            .is_some_and(|until| until > now)
    }

    /// Drops `conn_id`'s ring (kicked clients get no recovery); false if it had none.
    pub(crate) fn forget(&mut self, conn_id: &str) -> bool {
        self.clear(conn_id);
        self.drop_ring(conn_id)
    }

    /// Drops parked rings whose TTL passed; returns their conn_ids, and those of the
    /// parked rings the total bound dropped since the last sweep.
    pub(crate) fn sweep(&mut self, now: Instant) -> Vec<Rc<str>> {
        let mut expired = std::mem::take(&mut self.evicted);
        // One that came back since has a ring again, and its route is live.
        expired.retain(|id| !self.rings.contains_key(id));
        while let Some((_, until)) = self.expiries.front()
            && *until <= now
        {
            let (id, until) = self.expiries.pop_front().expect("front checked");
            let due = self
                .rings
                .get(&id)
                .is_some_and(|r| r.parked_until == Some(until));
            if due {
                self.forget(&id);
                expired.push(id);
            }
        }
        self.compact();
        expired
    }

    /// Takes a parked ring out to hand it to another shard.
    pub(crate) fn take(&mut self, conn_id: &str) -> Option<Parcel> {
        self.clear_bytes_of(conn_id);
        self.remove_ring(conn_id).map(Parcel)
    }

    /// A ring for `conn_id` arrives from another shard: until it does, pushes are kept in
    /// a parked ring here (parked from `now`), numbered again once it is in.
    pub(crate) fn expect(&mut self, conn_id: &Rc<str>, now: Instant) {
        self.forget(conn_id);
        self.ring_for(conn_id).orphan = true;
        self.set_parked(Rc::clone(conn_id), now + self.limits.ttl);
        self.enforce_total_sparing(Some(conn_id));
    }

    /// Puts a ring from another shard here, parked from `now`, followed by whatever was
    /// kept since [`RecoveryStore::expect`] (numbered after it: no client saw those
    /// seqs). Without a ring (it expired there) what was kept since stays as it is.
    pub(crate) fn adopt(&mut self, conn_id: &Rc<str>, parcel: Option<Parcel>, now: Instant) {
        let Some(Parcel(mut ring)) = parcel else {
            return;
        };
        ring.orphan = false;
        let since_expected: Vec<Arc<Message>> = self
            .rings
            .get(conn_id)
            .map(|r| r.entries.iter().map(|(_, m)| Arc::clone(m)).collect())
            .unwrap_or_default();
        self.forget(conn_id);
        let entries = std::mem::take(&mut ring.entries);
        ring.bytes = 0;
        *self.ring_for(conn_id) = ring;
        self.set_parked(Rc::clone(conn_id), now + self.limits.ttl);
        for (seq, message) in entries {
            self.keep(conn_id, seq, &message);
        }
        for message in &since_expected {
            self.record(conn_id, message);
        }
        // After the messages are in: the adopted ring is not an empty one to evict.
        self.enforce_total_sparing(Some(conn_id));
    }

    pub(crate) fn figures(&self) -> StoreFigures {
        StoreFigures {
            rings: self.rings.len(),
            parked: self
                .rings
                .values()
                .filter(|r| r.parked_until.is_some())
                .count(),
            messages: self.kept,
            bytes: self.bytes,
        }
    }

    /// Appends `(seq, message)` to `conn_id`'s ring, then applies the bounds, oldest first.
    fn keep(&mut self, conn_id: &Rc<str>, seq: u64, message: &Arc<Message>) {
        let size = cost(message);
        if size > self.limits.bytes || size > self.limits.total_bytes {
            // Too large to keep at all: numbered, and known lost at a reconnect.
            return;
        }
        let Some(ring) = self.rings.get_mut(conn_id) else {
            return;
        };
        while ring.entries.len() >= self.limits.window || ring.bytes + size > self.limits.bytes {
            let Some((_, old)) = ring.entries.pop_front() else {
                break;
            };
            ring.bytes -= cost(&old);
            self.bytes -= cost(&old);
            self.kept -= 1;
        }
        ring.entries.push_back((seq, Arc::clone(message)));
        ring.bytes += size;
        self.bytes += size;
        self.kept += 1;
        self.order.push_back((Rc::clone(conn_id), seq));
        self.enforce_total();
        self.compact();
    }

    /// `conn_id`'s ring, made (and counted) if it has none.
    fn ring_for(&mut self, conn_id: &Rc<str>) -> &mut Ring {
        if !self.rings.contains_key(conn_id) {
            self.bytes += ring_cost(conn_id);
        }
        let floor = self.limits.seq_floor;
        self.rings
            .entry(Rc::clone(conn_id))
            .or_insert_with(|| Ring {
                next_seq: floor.load(Ordering::Relaxed) + 1,
                ..Ring::default()
            })
    }

    /// Removes `conn_id`'s ring and what it counted for itself (its messages' bytes are
    /// the caller's to clear first).
    fn remove_ring(&mut self, conn_id: &str) -> Option<Ring> {
        let ring = self.rings.remove(conn_id)?;
        self.bytes -= ring_cost(conn_id);
        Some(ring)
    }

    /// Drops `conn_id`'s ring for good (not moved to another shard): its seqs are never
    /// given again in this epoch.
    fn drop_ring(&mut self, conn_id: &str) -> bool {
        let Some(ring) = self.remove_ring(conn_id) else {
            return false;
        };
        self.limits
            .seq_floor
            .fetch_max(ring.next_seq - 1, Ordering::Relaxed);
        true
    }

    /// Drops parked rings that hold no message, then the oldest messages, then the oldest
    /// parked rings, until the shard is within its total. Empty ones go first: they keep
    /// nothing but a numbering, and a stranger can park them by the thousand (connect and
    /// close with `"recover": true`) until every message pushed to a real client away
    /// was evicted the moment it was kept. Rings of connected clients stay: their count is
    /// bounded by the sessions.
    fn enforce_total(&mut self) {
        self.enforce_total_sparing(None);
    }

    /// [`RecoveryStore::enforce_total`], never evicting `spared`'s ring (one being
    /// adopted or expected: it is parked and may be empty until its messages are in).
    fn enforce_total_sparing(&mut self, spared: Option<&str>) {
        while self.bytes > self.limits.total_bytes {
            if !self.evict_empty_parked(spared)
                && !self.evict_oldest_message()
                && !self.evict_oldest_parked(spared)
            {
                return;
            }
        }
    }

    /// Whether the expiry entry `(id, until)` is its ring's current one (a ring parked
    /// again, or reattached, leaves its older entries behind).
    fn is_current(&self, id: &str, until: Instant) -> bool {
        self.rings
            .get(id)
            .is_some_and(|r| r.parked_until == Some(until))
    }

    /// Drops the first parked ring without messages among the [`EMPTY_SCAN`] current
    /// ones due to expire first; false if none is found there. Stale entries met at the
    /// front are dropped on the way and not counted, so that churn cannot fill the scan.
    fn evict_empty_parked(&mut self, spared: Option<&str>) -> bool {
        while let Some((id, until)) = self.expiries.front() {
            if self.is_current(id, *until) {
                break;
            }
            self.expiries.pop_front();
        }
        let mut looked = 0;
        let mut found = None;
        for (at, (id, until)) in self.expiries.iter().enumerate() {
            if looked == EMPTY_SCAN {
                break;
            }
            if !self.is_current(id, *until) {
                continue;
            }
            looked += 1;
            let empty = self.rings.get(id).is_some_and(|r| r.entries.is_empty());
            if empty && spared != Some(&**id) {
                found = Some(at);
                break;
            }
        }
        let Some(at) = found else {
            return false;
        };
        let (id, _) = self.expiries.remove(at).expect("found above");
        self.forget(&id);
        self.evicted.push(id);
        true
    }

    /// Drops the shard's oldest kept message; false if none is kept.
    fn evict_oldest_message(&mut self) -> bool {
        while let Some((id, seq)) = self.order.pop_front() {
            let Some(ring) = self.rings.get_mut(&id) else {
                continue;
            };
            if ring.entries.front().is_some_and(|(s, _)| *s == seq) {
                let (_, old) = ring.entries.pop_front().expect("front checked");
                ring.bytes -= cost(&old);
                if ring.entries.is_empty() {
                    // An empty ring gives its slots back: only RING_OVERHEAD is counted.
                    ring.entries = VecDeque::new();
                }
                self.bytes -= cost(&old);
                self.kept -= 1;
                return true;
            }
        }
        false
    }

    /// Drops the parked ring due to expire first (but `spared`'s); false if none is.
    fn evict_oldest_parked(&mut self, spared: Option<&str>) -> bool {
        let mut kept = None;
        let mut evicted = false;
        while let Some((id, until)) = self.expiries.pop_front() {
            if !self.is_current(&id, until) {
                continue;
            }
            if spared == Some(&*id) {
                kept = Some((id, until));
                continue;
            }
            self.forget(&id);
            self.evicted.push(id);
            evicted = true;
            break;
        }
        if let Some(entry) = kept {
            self.expiries.push_front(entry);
        }
        evicted
    }

    /// Keeps the age order within twice the entries kept (plus slack), so that entries a
    /// ring dropped by its own bounds cannot pile up there.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.kept + 64 {
            return;
        }
        // Entries leave a ring only from its front, so those still kept are the ones at
        // or past its oldest seq (checked in O(1), not by walking the ring).
        let rings = &self.rings;
        self.order.retain(|(id, seq)| {
            rings
                .get(id)
                .is_some_and(|ring| *seq >= ring.first_kept() && *seq < ring.next_seq)
        });
    }

    /// Empties `conn_id`'s ring, keeping its seqs.
    fn clear(&mut self, conn_id: &str) {
        self.clear_bytes_of(conn_id);
        if let Some(ring) = self.rings.get_mut(conn_id) {
            ring.entries = VecDeque::new();
            ring.bytes = 0;
        }
    }

    fn clear_bytes_of(&mut self, conn_id: &str) {
        if let Some(ring) = self.rings.get(conn_id) {
            self.bytes -= ring.bytes;
            self.kept -= ring.entries.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_last_event_id_is_an_epoch_and_a_seq() {
        assert_eq!(
            Since::from_last_event_id(b"0123abcdEF:42"),
            Some(Since {
                epoch: "0123abcdEF".into(),
                seq: 42
            })
        );
        assert_eq!(Since::from_last_event_id(b" e:7 ").map(|s| s.seq), Some(7));
        for bad in [
            &b""[..],
            b"e",
            b":5",
            b"e:",
            b"e:-1",
            b"e:1.5",
            b"e:99999999999999999999999",
            b"a b:1",
            b"\xff:1",
        ] {
            assert_eq!(Since::from_last_event_id(bad), None, "{bad:?}");
        }
        let long = format!("{}:1", "e".repeat(MAX_EPOCH + 1));
        assert_eq!(Since::from_last_event_id(long.as_bytes()), None);
    }

    const EPOCH: &str = "e1";

    fn limits(window: usize, bytes: usize, total_bytes: usize) -> Limits {
        Limits {
            seq_floor: Box::leak(Box::new(AtomicU64::new(0))),
            window,
            ttl: Duration::from_secs(60),
            bytes,
            total_bytes,
        }
    }

    fn store(window: usize) -> RecoveryStore {
        RecoveryStore::new(limits(window, 1 << 20, 1 << 30))
    }

    fn msg(text: &str) -> Arc<Message> {
        Message::new(text.as_bytes())
    }

    fn since(seq: u64) -> Since {
        Since {
            epoch: EPOCH.into(),
            seq,
        }
    }

    fn payloads(resume: &Resume) -> Vec<(u64, String)> {
        resume
            .replay
            .iter()
            .map(|(seq, m)| (*seq, String::from_utf8_lossy(m.payload()).into_owned()))
            .collect()
    }

    #[test]
    fn a_reconnect_gets_every_message_after_since_in_order() {
        let mut store = store(10);
        let id: Rc<str> = "a".into();
        assert!(store.attach(&id, None, EPOCH).is_none());
        for text in ["m1", "m2", "m3"] {
            store.record(&id, &msg(text));
        }
        let now = Instant::now();
        store.park(&id, now);
        assert!(store.buffer_if_parked("a", &msg("m4"), now));
        let resume = store.attach(&id, Some(&since(1)), EPOCH).unwrap();
        assert!(resume.lost.is_none());
        assert_eq!(resume.seq, 4);
        assert_eq!(
            payloads(&resume),
            [(2, "m2".into()), (3, "m3".into()), (4, "m4".into())]
        );
        assert_eq!(
            resume.header(EPOCH),
            r#"{"recovered":true,"epoch":"e1","seq":4}"#
        );
        // Attached again: live, no longer parked; the next seq follows on.
        assert!(!store.is_parked("a", now));
        assert_eq!(store.record(&id, &msg("m5")), 5);
    }

    #[test]
    fn nothing_missed_is_a_complete_recovery_with_nothing_to_replay() {
        let mut store = store(10);
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        store.record(&id, &msg("m1"));
        let resume = store.attach(&id, Some(&since(1)), EPOCH).unwrap();
        assert!(resume.lost.is_none() && resume.replay.is_empty());
    }

    #[test]
    fn opting_in_without_since_starts_afresh_with_seqs_going_on() {
        let mut store = store(10);
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        store.record(&id, &msg("m1"));
        store.park("a", Instant::now());
        assert!(store.attach(&id, None, EPOCH).is_none());
        assert_eq!(store.figures().messages, 0);
        assert_eq!(store.record(&id, &msg("m2")), 2);
    }

    #[test]
    fn a_window_exceeded_names_the_lost_seqs_and_replays_what_is_kept() {
        let mut store = store(2);
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        for i in 1..=5 {
            store.record(&id, &msg(&format!("m{i}")));
        }
        let resume = store.attach(&id, Some(&since(1)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::WindowExceeded, Some((2, 3)))));
        assert_eq!(payloads(&resume), [(4, "m4".into()), (5, "m5".into())]);
        assert_eq!(
            resume.header(EPOCH),
            r#"{"recovered":false,"epoch":"e1","seq":5,"reason":"window_exceeded","lost":[2,3]}"#
        );
    }

    #[test]
    fn another_epoch_or_no_buffer_is_not_recovered() {
        let mut store = store(4);
        let id: Rc<str> = "a".into();
        let other = Since {
            epoch: "e0".into(),
            seq: 3,
        };
        let resume = store.attach(&id, Some(&other), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::Epoch, None)));
        assert!(
            resume
                .header(EPOCH)
                .ends_with(r#""reason":"epoch","lost":null}"#)
        );
        let fresh: Rc<str> = "b".into();
        let resume = store.attach(&fresh, Some(&since(3)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::Expired, None)));
        assert_eq!(resume.seq, 0);
        store.record(&fresh, &msg("x"));
        let resume = store.attach(&fresh, Some(&since(9)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::UnknownSeq, None)));
        assert!(resume.replay.is_empty());
    }

    #[test]
    fn a_parked_ring_expires_after_its_ttl() {
        let mut store = store(4);
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        store.record(&id, &msg("m1"));
        let t0 = Instant::now();
        store.park("a", t0);
        assert!(store.sweep(t0 + Duration::from_secs(59)).is_empty());
        assert!(store.is_parked("a", t0 + Duration::from_secs(59)));
        assert!(!store.buffer_if_parked("a", &msg("late"), t0 + Duration::from_secs(60)));
        assert_eq!(
            store.sweep(t0 + Duration::from_secs(60)),
            std::slice::from_ref(&id)
        );
        assert_eq!(store.figures(), StoreFigures::default());
        let resume = store.attach(&id, Some(&since(1)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::Expired, None)));
    }

    #[test]
    fn a_ring_parked_again_expires_at_its_latest_ttl_only() {
        let mut store = store(4);
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        let t0 = Instant::now();
        store.park("a", t0);
        store.attach(&id, None, EPOCH);
        store.park("a", t0 + Duration::from_secs(30));
        assert!(
            store.sweep(t0 + Duration::from_secs(60)).is_empty(),
            "re-parked at 30 s"
        );
        assert_eq!(store.sweep(t0 + Duration::from_secs(90)).len(), 1);
        assert!(store.expiries.is_empty());
        // Reattached: never due.
        store.attach(&id, None, EPOCH);
        store.park("a", t0);
        store.attach(&id, None, EPOCH);
        assert!(store.sweep(t0 + Duration::from_secs(600)).is_empty());
    }

    #[test]
    fn pushes_to_ids_never_parked_are_not_kept() {
        let mut store = store(4);
        assert!(!store.buffer_if_parked("nobody", &msg("m"), Instant::now()));
        let id: Rc<str> = "live".into();
        store.attach(&id, None, EPOCH);
        assert!(
            !store.buffer_if_parked("live", &msg("m"), Instant::now()),
            "a live ring is fed by record, not as an absent client's"
        );
    }

    #[test]
    fn the_byte_bound_per_conn_id_drops_the_oldest() {
        let one = 10 + ENTRY_OVERHEAD;
        let mut store = RecoveryStore::new(limits(100, 3 * one, 1 << 30));
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        for i in 0..5 {
            store.record(&id, &msg(&format!("{i:010}")));
        }
        assert_eq!(store.figures().messages, 3);
        assert_eq!(store.figures().bytes, 3 * one + ring_cost("a"));
        let resume = store.attach(&id, Some(&since(0)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::WindowExceeded, Some((1, 2)))));
        // A message larger than the bound is numbered but never kept.
        store.record(&id, &msg(&"x".repeat(4 * one)));
        assert_eq!(store.figures().messages, 3);
    }

    #[test]
    fn the_shard_total_drops_the_oldest_across_conn_ids() {
        let one = 1 + ENTRY_OVERHEAD;
        let rings = 2 * ring_cost("a");
        let mut store = RecoveryStore::new(limits(100, 1 << 20, 4 * one + rings));
        let (a, b): (Rc<str>, Rc<str>) = ("a".into(), "b".into());
        store.attach(&a, None, EPOCH);
        store.attach(&b, None, EPOCH);
        store.record(&a, &msg("1"));
        store.record(&a, &msg("2"));
        store.record(&b, &msg("3"));
        store.record(&b, &msg("4"));
        store.record(&b, &msg("5"));
        assert_eq!(store.figures().bytes, 4 * one + rings);
        let resume = store.attach(&a, Some(&since(0)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::WindowExceeded, Some((1, 1)))));
        assert_eq!(payloads(&resume), [(2, "2".into())]);
    }

    #[test]
    fn empty_parked_rings_count_against_the_total_and_the_oldest_go() {
        // Room for ten rings of two-character conn_ids and nothing else.
        let mut store = RecoveryStore::new(limits(100, 1 << 20, 10 * ring_cost("c00")));
        let now = Instant::now();
        let ids: Vec<Rc<str>> = (0..30).map(|i| format!("c{i:02}").into()).collect();
        for (i, id) in ids.iter().enumerate() {
            store.attach(id, None, EPOCH);
            store.park(id, now + Duration::from_millis(i as u64));
        }
        let figures = store.figures();
        assert_eq!((figures.rings, figures.parked), (10, 10));
        assert_eq!(figures.bytes, 10 * ring_cost("c00"));
        // The first parked go first, and the next sweep reports them.
        assert!(!store.is_parked("c00", now));
        assert!(store.is_parked(&ids[29], now));
        let evicted = store.sweep(now);
        assert_eq!(evicted, ids[..20].to_vec());
        assert!(store.sweep(now).is_empty());
    }

    #[test]
    fn messages_go_before_parked_rings_and_live_rings_stay() {
        let one = 1 + ENTRY_OVERHEAD;
        let mut store = RecoveryStore::new(limits(100, 1 << 20, 2 * ring_cost("a") + one - 1));
        let (a, b): (Rc<str>, Rc<str>) = ("a".into(), "b".into());
        let now = Instant::now();
        store.attach(&a, None, EPOCH);
        store.park("a", now);
        assert!(store.buffer_if_parked("a", &msg("1"), now));
        // A live client's ring is made; a's message goes to make room, not a's ring.
        store.attach(&b, None, EPOCH);
        assert!(store.is_parked("a", now));
        assert_eq!(store.figures().messages, 0);
        // Live rings alone over the total: the parked one goes, the live ones stay.
        let c: Rc<str> = "c".into();
        store.attach(&c, None, EPOCH);
        assert!(!store.is_parked("a", now));
        assert_eq!(store.figures().rings, 2);
        assert_eq!(store.sweep(now), vec![a.clone()]);
        // A conn_id evicted and back before the sweep is not reported.
        store.park("b", now);
        store.attach(&"d".into(), None, EPOCH);
        store.attach(&b, None, EPOCH);
        assert!(store.sweep(now).is_empty());
    }

    #[test]
    fn a_buffer_made_again_numbers_above_every_dropped_one() {
        let mut store = store(8);
        let (a, b): (Rc<str>, Rc<str>) = ("a".into(), "b".into());
        store.attach(&a, None, EPOCH);
        for _ in 0..3 {
            store.record(&a, &msg("m"));
        }
        let now = Instant::now();
        store.park("a", now);
        // Expired (or kicked): the next session of `a` must not see seq 1 again.
        store.sweep(now + Duration::from_secs(61));
        store.attach(&a, None, EPOCH);
        assert_eq!(store.record(&a, &msg("again")), 4);
        // The floor is the node's: another id made afresh numbers above it too.
        store.attach(&b, None, EPOCH);
        assert_eq!(store.record(&b, &msg("b")), 4);
        // A reconnect after the drop is told what it is: expired, and the last seq.
        store.forget("a");
        let resume = store.attach(&a, Some(&since(3)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::Expired, None)));
        assert_eq!(resume.seq, 4);
    }

    #[test]
    fn empty_parked_rings_go_before_a_message_kept_for_a_client_away() {
        let one = 1 + ENTRY_OVERHEAD;
        let room = 3 * ring_cost("c0") + one;
        let mut store = RecoveryStore::new(limits(100, 1 << 20, room));
        let now = Instant::now();
        for id in ["c0", "c1"] {
            store.attach(&id.into(), None, EPOCH);
            store.park(id, now);
        }
        let real: Rc<str> = "c2".into();
        store.attach(&real, None, EPOCH);
        store.park("c2", now);
        assert!(store.buffer_if_parked("c2", &msg("1"), now));
        // A stranger parks more empty rings: they push out the other empty ones, never
        // the message.
        for id in ["c3", "c4", "c5"] {
            store.attach(&id.into(), None, EPOCH);
            store.park(id, now);
        }
        assert_eq!(store.figures().messages, 1);
        assert!(store.is_parked("c2", now));
        // A message the bounds cannot keep is not reported kept.
        let huge = "x".repeat(2 * room);
        assert!(!store.buffer_if_parked("c2", &msg(&huge), now));
    }

    #[test]
    fn churn_of_one_conn_id_does_not_hide_the_empty_rings_from_eviction() {
        let one = 1 + ENTRY_OVERHEAD;
        let room = 3 * ring_cost("c0") + one;
        let mut store = RecoveryStore::new(limits(100, 1 << 20, room));
        let now = Instant::now();
        let churned: Rc<str> = "c9".into();
        // One client reconnecting within the TTL, over and over: 100 stale expiry entries.
        for i in 0..100 {
            store.attach(&churned, None, EPOCH);
            store.park("c9", now + Duration::from_millis(i));
        }
        let real: Rc<str> = "c2".into();
        store.attach(&real, None, EPOCH);
        store.park("c2", now + Duration::from_secs(1));
        assert!(store.buffer_if_parked("c2", &msg("1"), now));
        for id in ["c3", "c4", "c5"] {
            store.attach(&id.into(), None, EPOCH);
            store.park(id, now + Duration::from_secs(2));
        }
        assert_eq!(store.figures().messages, 1, "the message stays");
        assert!(
            store.expiries.len() < 100,
            "stale entries were dropped on the way"
        );
    }

    #[test]
    fn a_client_reconnecting_in_a_loop_leaves_a_bounded_expiry_order() {
        let mut store = store(4);
        let now = Instant::now();
        let id: Rc<str> = "loop".into();
        for i in 0..10_000 {
            store.attach(&id, None, EPOCH);
            store.park("loop", now + Duration::from_millis(i));
        }
        assert!(store.expiries.len() <= 2 * store.rings.len() + 65);
        assert!(store.is_parked("loop", now), "the current entry stays");
        assert_eq!(store.sweep(now + Duration::from_secs(3600)).len(), 1);
        assert!(store.expiries.is_empty());
    }

    #[test]
    fn an_adopted_ring_is_not_evicted_as_empty_while_it_moves_in() {
        let one = 2 + ENTRY_OVERHEAD;
        let mut from = store(4);
        let id: Rc<str> = "a".into();
        from.attach(&id, None, EPOCH);
        from.record(&id, &msg("m1"));
        let now = Instant::now();
        from.park("a", now);
        let parcel = from.take("a");
        // The new shard is full of empty parked rings.
        let mut to = RecoveryStore::new(limits(100, 1 << 20, 3 * ring_cost("a") + one));
        for other in ["b", "c"] {
            to.attach(&other.into(), None, EPOCH);
            to.park(other, now);
        }
        to.expect(&id, now);
        assert!(to.is_parked("a", now), "the expected ring is spared");
        to.adopt(&id, parcel, now);
        assert!(to.is_parked("a", now));
        let resume = to.attach(&id, Some(&since(0)), EPOCH).unwrap();
        assert_eq!(payloads(&resume), [(1, "m1".into())]);
    }

    #[test]
    fn a_flood_keeps_the_age_order_bounded() {
        let mut store = store(2);
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        for _ in 0..10_000 {
            store.record(&id, &msg("m"));
        }
        assert_eq!(store.figures().messages, 2);
        assert!(store.order.len() <= 2 * 2 + 64 + 1);
    }

    #[test]
    fn forgetting_drops_the_ring_and_its_bytes() {
        let mut store = store(4);
        let id: Rc<str> = "a".into();
        store.attach(&id, None, EPOCH);
        store.record(&id, &msg("m"));
        store.forget("a");
        assert_eq!(store.figures(), StoreFigures::default());
    }

    #[test]
    fn a_parcel_moves_a_parked_ring_to_another_shard() {
        let mut from = store(4);
        let mut to = store(4);
        let id: Rc<str> = "a".into();
        from.attach(&id, None, EPOCH);
        from.record(&id, &msg("m1"));
        from.record(&id, &msg("m2"));
        let now = Instant::now();
        from.park("a", now);
        // Pushed on the new shard while the ring is on its way.
        to.expect(&id, now);
        assert!(to.buffer_if_parked("a", &msg("m3"), now));
        let parcel = from.take("a");
        assert_eq!(from.figures(), StoreFigures::default());
        to.adopt(&id, parcel, now);
        assert!(to.is_parked("a", now));
        assert!(to.buffer_if_parked("a", &msg("m4"), now));
        let resume = to.attach(&id, Some(&since(1)), EPOCH).unwrap();
        assert!(resume.lost.is_none());
        assert_eq!(
            payloads(&resume),
            [(2, "m2".into()), (3, "m3".into()), (4, "m4".into())]
        );
    }

    #[test]
    fn the_token_fields_are_checked() {
        use serde_json::{Value, json};
        assert_eq!(
            Request::from_token(&Value::Null, &Value::Null),
            Ok(Request::default())
        );
        let asked = Request::from_token(&json!(true), &json!({"epoch": "e1", "seq": 4})).unwrap();
        assert_eq!(asked.since, Some(since(4)));
        assert!(asked.recover);
        let long = "y".repeat(8000);
        assert_eq!(
            Request::from_token(&json!(long), &Value::Null).unwrap_err(),
            "`recover` must be true or false, not a string",
            "the client's value is not repeated back"
        );
        assert!(Request::from_token(&json!(true), &json!({"epoch": "e1", "seq": -1})).is_err());
        assert!(
            Request::from_token(&json!(true), &json!({"epoch": "e".repeat(65), "seq": 1})).is_err()
        );
        assert!(Request::from_token(&json!(true), &json!([1])).is_err());
    }

    #[test]
    fn a_ring_that_expired_on_its_way_is_not_recovered_but_keeps_what_came_since() {
        let mut store = store(4);
        let id: Rc<str> = "a".into();
        let now = Instant::now();
        store.expect(&id, now);
        assert!(store.buffer_if_parked("a", &msg("new"), now));
        store.adopt(&id, None, now);
        let resume = store.attach(&id, Some(&since(1)), EPOCH).unwrap();
        assert_eq!(resume.lost, Some((Lost::Expired, None)));
        assert_eq!(payloads(&resume), [(1, "new".into())]);
    }

    #[test]
    fn frames_carry_seq_epoch_and_the_escaped_message() {
        assert_eq!(
            message_text("e\"1", 7, b"hi \"you\""),
            r#"{"seq":7,"epoch":"e\"1","msg":"hi \"you\""}"#
        );
        assert_eq!(
            message_line("e1", 7, b"hi"),
            "{\"type\":\"message\",\"data\":\"hi\",\"seq\":7,\"epoch\":\"e1\"}\n"
        );
    }
}
