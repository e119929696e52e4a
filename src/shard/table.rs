//! A shard's session table: its sessions by conn_id, its groups, and the counts of what
//! happened to them (deliveries that failed, sessions ended, by reason).
//!
//! Pure: no sockets, timers or channels. Time comes in as `now`, and what a rule decides
//! is done through the sessions' own queues (`Session::deliver`, `request_close`), so
//! every rule of push, broadcast, kick, groups and the heartbeat runs in a unit test in
//! milliseconds. It must never report presence or talk to the directory: the shard does
//! that around it, in the order the presence ledger needs.
//!
//! It also holds the shard's recovery buffers (`crate::recovery`): a session that opted
//! in gets each message numbered and framed for it alone; a parked buffer takes pushes by
//! conn_id while its client is away; a session that registers with `since` gets its
//! first frame and what it missed before anything live.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{AHashMap, AHashSet};

use crate::codec::{Message, Wire};
use crate::link::{BroadcastOutcome, PushOutcome};
use crate::recovery::{self, Limits, Parcel, RecoveryStore, Since, StoreFigures};
use crate::session::{CloseReason, Delivery, Session};

/// What handing one message to one conn_id did.
enum Reach {
    Delivered,
    /// Kept in the recovery buffer for a reconnect (the client is away or closing).
    Buffered,
    Failed(&'static str),
}

/// The heartbeat rules: when a quiet client is pinged, when a silent one is dropped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heartbeat {
    pub(crate) ping_interval: Duration,
    pub(crate) timeout: Duration,
}

/// The ping bytes of each framing that is pinged (RESP clients are not: Redis clients do
/// not answer a server's ping, and rely on TCP keepalive).
pub(crate) struct Pings {
    pub(crate) websocket: Arc<[u8]>,
    pub(crate) json: Arc<[u8]>,
    /// The comment that keeps an event stream's proxies from timing out.
    pub(crate) sse: Arc<[u8]>,
}

/// The figures of the table that a shard reports.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct TableFigures {
    pub(crate) connections: usize,
    pub(crate) connections_by_transport: BTreeMap<&'static str, usize>,
    pub(crate) queued_messages: usize,
    pub(crate) queued_bytes: usize,
}

/// Sessions by conn_id and groups by name, with their counters.
#[derive(Default)]
pub(crate) struct SessionTable {
    sessions: AHashMap<Rc<str>, Rc<Session>>,
    groups: AHashMap<Rc<str>, AHashSet<Rc<str>>>,
    delivery_failures: BTreeMap<&'static str, u64>,
    disconnects: BTreeMap<&'static str, u64>,
    recovery: Option<Recovery>,
}

/// The recovery buffers and the epoch their seqs belong to.
struct Recovery {
    store: RecoveryStore,
    epoch: Rc<str>,
}

impl SessionTable {
    /// A table keeping recovery buffers within `limits`, numbering in `epoch`.
    pub(crate) fn with_recovery(limits: Limits, epoch: &str) -> SessionTable {
        SessionTable {
            recovery: (limits.window > 0).then(|| Recovery {
                store: RecoveryStore::new(limits),
                epoch: epoch.into(),
            }),
            ..SessionTable::default()
        }
    }

    /// Puts a session in the table (the directory granted its conn_id to this shard, so
    /// no other session here holds it). A recovering session with `since` is handed its
    /// first frame and the messages it missed, before anything else.
    pub(crate) fn insert(&mut self, session: &Rc<Session>, since: Option<&Since>) {
        self.sessions
            .insert(Rc::clone(&session.conn_id), Rc::clone(session));
        let Some(recovery) = self.recovery.as_mut().filter(|_| session.recovers()) else {
            return;
        };
        let Some(resume) = recovery
            .store
            .attach(&session.conn_id, since, &recovery.epoch)
        else {
            return;
        };
        let header = resume.header(&recovery.epoch);
        session.deliver(&match session.wire() {
            Wire::JsonLines => Message::with_json_line(
                header.as_bytes(),
                format!("{header}\n").into_bytes().into(),
            ),
            _ => Message::new(header.as_bytes()),
        });
        for (seq, message) in &resume.replay {
            session.deliver(&numbered(&recovery.epoch, session.wire(), *seq, message));
        }
    }

    /// Takes an ended session out (only that session: a successor under the same conn_id
    /// stays), takes it out of its groups and counts why it ended. A recovering session's
    /// buffer is parked from `now` unless it was kicked; true when it was.
    pub(crate) fn remove(
        &mut self,
        session: &Rc<Session>,
        reason: &CloseReason,
        now: Instant,
    ) -> bool {
        let mut parked = false;
        if self
            .sessions
            .get(&session.conn_id)
            .is_some_and(|s| Rc::ptr_eq(s, session))
        {
            self.sessions.remove(&session.conn_id);
            if let Some(recovery) = self.recovery.as_mut().filter(|_| session.recovers()) {
                // Kicked: no recovery. Shutdown: this process is stopping or handing
                // over, and its buffers die with it (a successor numbers in a new
                // epoch), so a push kept here would be answered `buffered` and never
                // replayed; it fails instead, or reaches the client on the successor.
                if matches!(reason, CloseReason::Kicked | CloseReason::Shutdown) {
                    recovery.store.forget(&session.conn_id);
                } else {
                    recovery.store.park(&session.conn_id, now);
                    parked = true;
                }
            }
        }
        *self.disconnects.entry(reason.label()).or_default() += 1;
        for group in session.take_groups() {
            if let Some(members) = self.groups.get_mut(&group) {
                members.remove(&session.conn_id);
                if members.is_empty() {
                    self.groups.remove(&group);
                }
            }
        }
        parked
    }

    /// Hands `message` to each of `conn_ids` (or, for a client away, to its parked
    /// recovery buffer still within its TTL at `now`).
    pub(crate) fn push(
        &mut self,
        message: &Arc<Message>,
        conn_ids: Vec<String>,
        now: Instant,
    ) -> PushOutcome {
        let mut outcome = PushOutcome::default();
        for id in conn_ids {
            let reach = match self.sessions.get(id.as_str()) {
                Some(session) => reach(&mut self.recovery, session, message),
                None => {
                    let kept = self
                        .recovery
                        .as_mut()
                        .is_some_and(|r| r.store.buffer_if_parked(&id, message, now));
                    if kept {
                        Reach::Buffered
                    } else {
                        Reach::Failed("unknown")
                    }
                }
            };
            match reach {
                Reach::Delivered => {}
                Reach::Buffered => outcome.buffered.push(id),
                Reach::Failed(why) => {
                    *self.delivery_failures.entry(why).or_default() += 1;
                    outcome.failed.push(id);
                }
            }
        }
        outcome
    }

    /// Hands `message` to every session.
    pub(crate) fn broadcast(&mut self, message: &Arc<Message>) -> BroadcastOutcome {
        let mut outcome = BroadcastOutcome::default();
        for session in self.sessions.values() {
            let reach = reach(&mut self.recovery, session, message);
            count(&mut self.delivery_failures, &mut outcome, session, reach);
        }
        outcome
    }

    /// Hands `message` to every member of `group` here.
    pub(crate) fn group_push(&mut self, group: &str, message: &Arc<Message>) -> BroadcastOutcome {
        let mut outcome = BroadcastOutcome::default();
        let Some(members) = self.groups.get(group) else {
            return outcome;
        };
        for member in members {
            let Some(session) = self.sessions.get(member) else {
                *self.delivery_failures.entry("unknown").or_default() += 1;
                outcome.failed.push(member.to_string());
                continue;
            };
            let reach = reach(&mut self.recovery, session, message);
            count(&mut self.delivery_failures, &mut outcome, session, reach);
        }
        outcome
    }

    /// Drops parked recovery buffers whose TTL passed at `now`; returns their conn_ids.
    pub(crate) fn sweep_recovery(&mut self, now: Instant) -> Vec<Rc<str>> {
        self.recovery
            .as_mut()
            .map(|r| r.store.sweep(now))
            .unwrap_or_default()
    }

    /// A reclaim of `conn_id` is under way from another shard: pushes to it are kept here
    /// (parked from `now`) until [`SessionTable::adopt`].
    pub(crate) fn expect_parcel(&mut self, conn_id: &str, now: Instant) {
        if let Some(r) = &mut self.recovery {
            r.store.expect(&conn_id.into(), now);
        }
    }

    /// Takes the parked buffer of `conn_id` out for another shard (none if it expired).
    pub(crate) fn hand_over(&mut self, conn_id: &str) -> Option<Parcel> {
        self.recovery.as_mut()?.store.take(conn_id)
    }

    /// Puts the buffer handed over for `conn_id` here, before what was kept since
    /// [`SessionTable::expect_parcel`].
    pub(crate) fn adopt(&mut self, conn_id: &str, parcel: Option<Parcel>, now: Instant) {
        if let Some(r) = &mut self.recovery {
            r.store.adopt(&conn_id.into(), parcel, now);
        }
    }

    /// Whether a parked recovery buffer for `conn_id` is kept here at `now`.
    pub(crate) fn keeps_parked(&self, conn_id: &str, now: Instant) -> bool {
        self.recovery
            .as_ref()
            .is_some_and(|r| r.store.is_parked(conn_id, now))
    }

    /// What the recovery buffers hold.
    pub(crate) fn recovery_figures(&self) -> StoreFigures {
        self.recovery
            .as_ref()
            .map(|r| r.store.figures())
            .unwrap_or_default()
    }

    /// Drops the parked recovery buffers of `conn_ids` (a kick of a client already away:
    /// kicked clients get no recovery); returns the conn_ids whose buffer it dropped.
    pub(crate) fn drop_parked(&mut self, conn_ids: &[String]) -> Vec<String> {
        let Some(recovery) = &mut self.recovery else {
            return Vec::new();
        };
        conn_ids
            .iter()
            .filter(|id| !self.sessions.contains_key(id.as_str()) && recovery.store.forget(id))
            .cloned()
            .collect()
    }

    /// Asks each of `conn_ids` to close for `reason`; returns those not here.
    pub(crate) fn kick(&self, conn_ids: Vec<String>, reason: &CloseReason) -> Vec<String> {
        conn_ids
            .into_iter()
            .filter(|id| match self.sessions.get(id.as_str()) {
                Some(session) => {
                    session.request_close(reason.clone());
                    false
                }
                None => true,
            })
            .collect()
    }

    /// Adds each of `conn_ids` to `group`; returns those not here. No empty group is kept.
    pub(crate) fn join(&mut self, group: &str, conn_ids: Vec<String>) -> Vec<String> {
        let name: Rc<str> = match self.groups.get_key_value(group) {
            Some((name, _)) => Rc::clone(name),
            None => group.into(),
        };
        let members = self.groups.entry(Rc::clone(&name)).or_default();
        let missing = conn_ids
            .into_iter()
            .filter(|id| match self.sessions.get(id.as_str()) {
                Some(session) => {
                    if members.insert(Rc::clone(&session.conn_id)) {
                        session.joined(Rc::clone(&name));
                    }
                    false
                }
                None => true,
            })
            .collect();
        if members.is_empty() {
            self.groups.remove(group);
        }
        missing
    }

    /// Takes each of `conn_ids` out of `group`; returns those not here.
    pub(crate) fn leave(&mut self, group: &str, conn_ids: Vec<String>) -> Vec<String> {
        let missing = conn_ids
            .into_iter()
            .filter(|id| {
                let Some(session) = self.sessions.get(id.as_str()) else {
                    return true;
                };
                if let Some(members) = self.groups.get_mut(group) {
                    members.remove(id.as_str());
                }
                session.left(group);
                false
            })
            .collect();
        if self
            .groups
            .get(group)
            .is_some_and(|members| members.is_empty())
        {
            self.groups.remove(group);
        }
        missing
    }

    /// Pings sessions quiet for a ping interval; closes those silent past the timeout.
    /// A session over its byte budget is not read from, so it goes silent too: one that
    /// stays over for a heartbeat timeout, whatever it speaks, is a slow consumer.
    pub(crate) fn sweep(&self, now: Instant, heartbeat: Heartbeat, pings: &Pings) {
        for session in self.sessions.values() {
            if matches!(session.wire(), Wire::Sse | Wire::Resp) && !session.is_over_budget() {
                // These clients need never send: their silence is counted from the last
                // sweep that found them within their budget, so that one is a slow
                // consumer after a heartbeat timeout over it, not at the first sweep that
                // finds a large push still being written (an SSE stream's last bytes were
                // those of its request).
                session.touch(now);
            }
            let silent = now.saturating_duration_since(session.last_seen());
            if silent > heartbeat.timeout && session.is_over_budget() {
                session.request_close(CloseReason::SlowConsumer);
                continue;
            }
            let ping = match session.wire() {
                Wire::WebSocket | Wire::WebSocketDeflate(_) => &pings.websocket,
                Wire::JsonLines => &pings.json,
                Wire::Resp => continue,
                Wire::Sse => {
                    // An event stream never answers: its comment keeps proxies from timing
                    // out; a dead peer fails the writes or fills the queue.
                    if now.saturating_duration_since(session.last_ping()) >= heartbeat.ping_interval
                    {
                        session.send_control(&pings.sse);
                        session.pinged(now);
                    }
                    continue;
                }
            };
            if silent > heartbeat.timeout {
                session.request_close(CloseReason::HeartbeatTimeout);
            } else if silent >= heartbeat.ping_interval
                && now.saturating_duration_since(session.last_ping()) >= heartbeat.ping_interval
            {
                session.send_control(ping);
                session.pinged(now);
            }
        }
    }

    /// Sessions held by the table alone: every registered session is held by its
    /// connection task until the task removes it, so these lost their task to a panic.
    pub(crate) fn orphans(&self) -> Vec<Rc<Session>> {
        self.sessions
            .values()
            .filter(|session| Rc::strong_count(session) == 1)
            .cloned()
            .collect()
    }

    /// Every session, for a drain.
    pub(crate) fn all(&self) -> Vec<Rc<Session>> {
        self.sessions.values().cloned().collect()
    }

    pub(crate) fn figures(&self) -> TableFigures {
        let mut connections_by_transport: BTreeMap<&'static str, usize> =
            [Wire::WebSocket, Wire::JsonLines, Wire::Resp, Wire::Sse]
                .into_iter()
                .map(|wire| (wire.label(), 0))
                .collect();
        for session in self.sessions.values() {
            *connections_by_transport
                .entry(session.wire().label())
                .or_default() += 1;
        }
        TableFigures {
            connections: self.sessions.len(),
            connections_by_transport,
            queued_messages: self.sessions.values().map(|s| s.backlog_messages()).sum(),
            queued_bytes: self.sessions.values().map(|s| s.backlog_bytes()).sum(),
        }
    }

    /// Deliveries that failed here, by reason (`unknown`, `closed`, `queue_full`).
    pub(crate) fn delivery_failures(&self) -> &BTreeMap<&'static str, u64> {
        &self.delivery_failures
    }

    /// Sessions ended, by close reason.
    pub(crate) fn disconnects(&self) -> &BTreeMap<&'static str, u64> {
        &self.disconnects
    }
}

/// Delivers to one session: the shared message, or for a recovering one its own
/// numbered frame, kept in its buffer first (so that a session closing now still gets it
/// on its reconnect, unless it was kicked).
fn reach(recovery: &mut Option<Recovery>, session: &Session, message: &Arc<Message>) -> Reach {
    let Some(recovery) = recovery.as_mut().filter(|_| session.recovers()) else {
        return match session.deliver(message) {
            Delivery::Sent | Delivery::Queued => Reach::Delivered,
            Delivery::Overflow => Reach::Failed("queue_full"),
            Delivery::Closed => Reach::Failed("closed"),
        };
    };
    if session.close_reason() == Some(CloseReason::Kicked) {
        return Reach::Failed("closed");
    }
    let seq = recovery.store.record(&session.conn_id, message);
    let framed = numbered(&recovery.epoch, session.wire(), seq, message);
    if session.deliver(&framed).accepted() {
        Reach::Delivered
    } else {
        Reach::Buffered
    }
}

/// Counts one session's part of a broadcast or group push (a buffered message counts as
/// delivered: its client gets it on its reconnect).
fn count(
    failures: &mut BTreeMap<&'static str, u64>,
    outcome: &mut BroadcastOutcome,
    session: &Session,
    reach: Reach,
) {
    match reach {
        Reach::Delivered | Reach::Buffered => outcome.delivered += 1,
        Reach::Failed(why) => {
            *failures.entry(why).or_default() += 1;
            outcome.failed.push(session.conn_id.to_string());
        }
    }
}

/// Message `seq` framed for one recovering client on `wire`.
fn numbered(epoch: &str, wire: Wire, seq: u64, message: &Message) -> Arc<Message> {
    match wire {
        Wire::JsonLines => Message::with_json_line(
            message.payload(),
            recovery::message_line(epoch, seq, message.payload())
                .into_bytes()
                .into(),
        ),
        // On an event stream the numbering is the event's `id:` and the data is the
        // message itself: EventSource hands the id back as `Last-Event-ID`.
        Wire::Sse => Message::with_sse_event(
            message.payload(),
            crate::codec::sse::event_with_id(epoch, seq, message.payload()),
        ),
        Wire::WebSocket | Wire::Resp => {
            Message::new(recovery::message_text(epoch, seq, message.payload()).as_bytes())
        }
        // Made for this session alone: compressing it would cost one compression per
        // recipient (`Message::uncompressed`).
        Wire::WebSocketDeflate(_) => {
            Message::uncompressed(recovery::message_text(epoch, seq, message.payload()).as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionSpec;

    const HEARTBEAT: Heartbeat = Heartbeat {
        ping_interval: Duration::from_secs(9),
        timeout: Duration::from_secs(10),
    };

    fn pings() -> Pings {
        Pings {
            websocket: Arc::from(&b"ws-ping"[..]),
            json: Arc::from(&b"json-ping\n"[..]),
            sse: Arc::from(&b": ping\n\n"[..]),
        }
    }

    /// A session with no socket: what it is handed waits in its queue.
    fn session(conn_id: &str, wire: Wire, queue_limit: usize) -> Rc<Session> {
        Rc::new(Session::new(SessionSpec {
            conn_id: conn_id.into(),
            info: String::new(),
            wire,
            message_head: Box::default(),
            direct_fd: None,
            queue_limit,
            queue_bytes: 1 << 20,
            recover: false,
        }))
    }

    fn table_of(sessions: &[&Rc<Session>]) -> SessionTable {
        let mut table = SessionTable::default();
        for s in sessions {
            table.insert(s, None);
        }
        table
    }

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_push_reaches_the_named_sessions_and_reports_the_rest() {
        let (a, b) = (
            session("a", Wire::WebSocket, 8),
            session("b", Wire::JsonLines, 8),
        );
        let mut table = table_of(&[&a, &b]);
        let failed = table
            .push(
                &Message::new(b"hi"),
                ids(&["a", "nobody", "b"]),
                Instant::now(),
            )
            .failed;
        assert_eq!(failed, ["nobody"]);
        assert_eq!((a.backlog_messages(), b.backlog_messages()), (1, 1));
        assert_eq!(table.delivery_failures().get("unknown"), Some(&1));
    }

    #[test]
    fn a_full_queue_fails_the_push_and_closes_the_slow_consumer() {
        let slow = session("slow", Wire::WebSocket, 1);
        let mut table = table_of(&[&slow]);
        assert!(
            table
                .push(&Message::new(b"1"), ids(&["slow"]), Instant::now())
                .failed
                .is_empty()
        );
        assert_eq!(
            table
                .push(&Message::new(b"2"), ids(&["slow"]), Instant::now())
                .failed,
            ["slow"]
        );
        assert_eq!(table.delivery_failures().get("queue_full"), Some(&1));
        assert!(matches!(
            slow.close_reason(),
            Some(CloseReason::SlowConsumer)
        ));
        // Closing now: a later push fails as `closed`, not queued behind the close.
        assert_eq!(
            table
                .push(&Message::new(b"3"), ids(&["slow"]), Instant::now())
                .failed,
            ["slow"]
        );
        assert_eq!(table.delivery_failures().get("closed"), Some(&1));
    }

    #[test]
    fn a_broadcast_reaches_every_session_and_names_those_closing() {
        let (a, b) = (
            session("a", Wire::WebSocket, 8),
            session("b", Wire::Resp, 8),
        );
        b.request_close(CloseReason::Kicked);
        let mut table = table_of(&[&a, &b]);
        let outcome = table.broadcast(&Message::new(b"all"));
        assert_eq!((outcome.delivered, &outcome.failed), (1, &ids(&["b"])));
        let merged = BroadcastOutcome::merge([outcome.clone(), outcome]);
        assert_eq!((merged.delivered, merged.failed.len()), (2, 2));
    }

    #[test]
    fn kick_closes_with_the_reason_and_names_the_absent() {
        let a = session("a", Wire::WebSocket, 8);
        let table = table_of(&[&a]);
        assert_eq!(
            table.kick(ids(&["a", "gone"]), &CloseReason::Kicked),
            ["gone"]
        );
        assert!(matches!(a.close_reason(), Some(CloseReason::Kicked)));
    }

    #[test]
    fn groups_hold_members_until_they_leave_or_end() {
        let (a, b) = (
            session("a", Wire::WebSocket, 8),
            session("b", Wire::WebSocket, 8),
        );
        let mut table = table_of(&[&a, &b]);
        assert_eq!(table.join("g", ids(&["a", "b", "x"])), ["x"]);
        // Joining twice adds nothing.
        assert!(table.join("g", ids(&["a"])).is_empty());
        assert_eq!(table.group_push("g", &Message::new(b"m")).delivered, 2);
        assert_eq!(a.backlog_messages(), 1);
        assert!(table.leave("g", ids(&["a"])).is_empty());
        assert_eq!(table.group_push("g", &Message::new(b"m")).delivered, 1);
        table.remove(&b, &CloseReason::ClientClosed, Instant::now());
        // The last member gone, the group is gone: nothing left to deliver to.
        assert_eq!(table.group_push("g", &Message::new(b"m")).delivered, 0);
        assert!(table.groups.is_empty());
        assert_eq!(table.leave("g", ids(&["b"])), ["b"]);
        assert!(table.join("empty", ids(&["nobody"])) == ["nobody"] && table.groups.is_empty());
    }

    #[test]
    fn removing_a_replaced_session_leaves_its_successor() {
        let old = session("same", Wire::WebSocket, 8);
        let new = session("same", Wire::WebSocket, 8);
        let mut table = table_of(&[&old]);
        table.insert(&new, None);
        table.remove(&old, &CloseReason::Replaced, Instant::now());
        assert!(
            table
                .push(&Message::new(b"m"), ids(&["same"]), Instant::now())
                .failed
                .is_empty()
        );
        assert_eq!(new.backlog_messages(), 1);
        assert_eq!(table.disconnects().get("replaced"), Some(&1));
        table.remove(&new, &CloseReason::ClientGone, Instant::now());
        assert_eq!(table.figures().connections, 0);
    }

    #[test]
    fn the_sweep_pings_the_quiet_and_drops_the_silent() {
        let (ws, json, resp) = (
            session("ws", Wire::WebSocket, 8),
            session("json", Wire::JsonLines, 8),
            session("resp", Wire::Resp, 8),
        );
        let table = table_of(&[&ws, &json, &resp]);
        let start = Instant::now();
        table.sweep(start + Duration::from_secs(5), HEARTBEAT, &pings());
        assert_eq!(ws.backlog_bytes(), 0, "not quiet long enough for a ping");
        table.sweep(start + Duration::from_millis(9_500), HEARTBEAT, &pings());
        assert_eq!(ws.backlog_bytes(), b"ws-ping".len());
        assert_eq!(json.backlog_bytes(), b"json-ping\n".len());
        assert_eq!(resp.backlog_bytes(), 0, "RESP clients are never pinged");
        // Pinged once per interval, not once per sweep.
        table.sweep(start + Duration::from_millis(9_900), HEARTBEAT, &pings());
        assert_eq!(ws.backlog_bytes(), b"ws-ping".len());
        ws.touch(start + Duration::from_secs(10));
        table.sweep(start + Duration::from_millis(10_500), HEARTBEAT, &pings());
        assert!(ws.close_reason().is_none(), "heard from: kept");
        assert!(matches!(
            json.close_reason(),
            Some(CloseReason::HeartbeatTimeout)
        ));
        assert!(resp.close_reason().is_none(), "left to TCP keepalive");
    }

    #[test]
    fn a_silent_session_over_its_budget_is_a_slow_consumer_whatever_it_speaks() {
        let resp = Rc::new(Session::new(SessionSpec {
            conn_id: "r".into(),
            info: String::new(),
            wire: Wire::Resp,
            message_head: Box::default(),
            direct_fd: None,
            queue_limit: 8,
            queue_bytes: 4,
            recover: false,
        }));
        let mut table = table_of(&[&resp]);
        assert!(
            table
                .push(
                    &Message::new(b"more than four"),
                    ids(&["r"]),
                    Instant::now()
                )
                .failed
                .is_empty()
        );
        assert!(resp.is_over_budget());
        table.sweep(
            Instant::now() + Duration::from_secs(11),
            HEARTBEAT,
            &pings(),
        );
        assert!(matches!(
            resp.close_reason(),
            Some(CloseReason::SlowConsumer)
        ));
    }

    #[test]
    fn a_client_that_never_sends_is_slow_only_after_a_timeout_over_its_budget() {
        for wire in [Wire::Sse, Wire::Resp] {
            let quiet = Rc::new(Session::new(SessionSpec {
                conn_id: "q".into(),
                info: String::new(),
                wire,
                message_head: Box::default(),
                direct_fd: None,
                queue_limit: 8,
                queue_bytes: 32,
                recover: false,
            }));
            let mut table = table_of(&[&quiet]);
            let start = Instant::now();
            // Nothing from it since it connected, within its budget.
            table.sweep(start + Duration::from_secs(5), HEARTBEAT, &pings());
            // One push larger than the budget (let into an empty queue), still being
            // written.
            let large = [b'x'; 40];
            table.push(&Message::new(&large), ids(&["q"]), start);
            assert!(quiet.is_over_budget(), "{wire:?}");
            // Silent for 12 s, past the timeout, but over its budget for 7 s only.
            table.sweep(start + Duration::from_secs(12), HEARTBEAT, &pings());
            assert!(quiet.close_reason().is_none(), "{wire:?}: over for 7 s");
            table.sweep(start + Duration::from_secs(16), HEARTBEAT, &pings());
            assert!(
                matches!(quiet.close_reason(), Some(CloseReason::SlowConsumer)),
                "{wire:?}: over for 11 s"
            );
        }
    }

    #[test]
    fn figures_count_sessions_by_transport_and_what_waits() {
        let (a, b) = (
            session("a", Wire::WebSocket, 8),
            session("b", Wire::JsonLines, 8),
        );
        let mut table = table_of(&[&a, &b]);
        table.push(&Message::new(b"xyz"), ids(&["a"]), Instant::now());
        let figures = table.figures();
        assert_eq!(figures.connections, 2);
        assert_eq!(figures.connections_by_transport["websocket"], 1);
        assert_eq!(figures.connections_by_transport["json"], 1);
        assert_eq!(figures.connections_by_transport["resp"], 0);
        assert_eq!(figures.queued_messages, 1);
        assert!(figures.queued_bytes >= 3);
    }

    #[test]
    fn orphans_are_the_sessions_only_the_table_holds() {
        let held = session("held", Wire::WebSocket, 8);
        let mut table = table_of(&[&held]);
        table.insert(&session("orphan", Wire::WebSocket, 8), None);
        let orphans = table.orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(&*orphans[0].conn_id, "orphan");
        assert_eq!(table.all().len(), 2);
    }

    fn recovering(conn_id: &str, wire: Wire) -> Rc<Session> {
        Rc::new(Session::new(SessionSpec {
            conn_id: conn_id.into(),
            info: String::new(),
            wire,
            message_head: Box::default(),
            direct_fd: None,
            queue_limit: 64,
            queue_bytes: 1 << 20,
            recover: true,
        }))
    }

    fn recovery_table() -> SessionTable {
        SessionTable::with_recovery(
            Limits {
                seq_floor: Box::leak(Box::new(std::sync::atomic::AtomicU64::new(0))),
                window: 8,
                ttl: Duration::from_secs(60),
                bytes: 1 << 20,
                total_bytes: 1 << 20,
            },
            "E",
        )
    }

    /// Every message text queued for `session`, in order.
    fn texts(session: &Session) -> Vec<String> {
        let bytes = session.take_unwritten();
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        // Unmasked text frames with 7-bit or 16-bit lengths.
        while rest.len() >= 2 {
            let (len, head) = match rest[1] {
                126 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
                n => (n as usize, 2),
            };
            out.push(String::from_utf8(rest[head..head + len].to_vec()).unwrap());
            rest = &rest[head + len..];
        }
        out
    }

    #[test]
    fn a_recovering_session_gets_numbered_frames_and_others_the_shared_one() {
        let (plain, numbered) = (
            session("p", Wire::WebSocket, 8),
            recovering("r", Wire::WebSocket),
        );
        let mut table = recovery_table();
        table.insert(&plain, None);
        table.insert(&numbered, None);
        let message = Message::new(b"hi");
        let now = Instant::now();
        assert_eq!(
            table.push(&message, ids(&["p", "r"]), now),
            PushOutcome::default()
        );
        table.push(&message, ids(&["r"]), now);
        assert_eq!(texts(&plain), ["hi"]);
        assert_eq!(
            texts(&numbered),
            [
                r#"{"seq":1,"epoch":"E","msg":"hi"}"#,
                r#"{"seq":2,"epoch":"E","msg":"hi"}"#
            ]
        );
        assert_eq!(
            table.recovery_figures().rings,
            1,
            "none for the plain client"
        );
    }

    #[test]
    fn pushes_while_away_are_buffered_and_replayed_after_the_first_frame() {
        let first = recovering("r", Wire::WebSocket);
        let mut table = recovery_table();
        table.insert(&first, None);
        let now = Instant::now();
        table.push(&Message::new(b"one"), ids(&["r"]), now);
        assert!(table.remove(&first, &CloseReason::ClientGone, now));
        assert!(table.keeps_parked("r", now));
        let outcome = table.push(&Message::new(b"two"), ids(&["r", "x"]), now);
        assert_eq!(outcome.buffered, ["r"]);
        assert_eq!(outcome.failed, ["x"]);
        let again = recovering("r", Wire::WebSocket);
        let since = Since {
            epoch: "E".into(),
            seq: 1,
        };
        table.insert(&again, Some(&since));
        assert_eq!(
            texts(&again),
            [
                r#"{"recovered":true,"epoch":"E","seq":2}"#,
                r#"{"seq":2,"epoch":"E","msg":"two"}"#
            ]
        );
        // The TTL passed: nothing kept, nothing buffered.
        table.remove(&again, &CloseReason::ClientGone, now);
        let later = now + Duration::from_secs(61);
        assert_eq!(table.sweep_recovery(later).len(), 1);
        assert_eq!(
            table.push(&Message::new(b"3"), ids(&["r"]), later).failed,
            ["r"]
        );
    }

    #[test]
    fn a_kicked_session_leaves_no_buffer() {
        let kicked = recovering("r", Wire::JsonLines);
        let mut table = recovery_table();
        table.insert(&kicked, None);
        let now = Instant::now();
        table.push(&Message::new(b"one"), ids(&["r"]), now);
        assert_eq!(
            kicked.take_unwritten(),
            b"{\"type\":\"message\",\"data\":\"one\",\"seq\":1,\"epoch\":\"E\"}\n"
        );
        table.kick(ids(&["r"]), &CloseReason::Kicked);
        assert_eq!(
            table.push(&Message::new(b"x"), ids(&["r"]), now).failed,
            ["r"]
        );
        assert!(!table.remove(&kicked, &CloseReason::Kicked, now));
        assert_eq!(table.recovery_figures(), StoreFigures::default());
        // Kicked while away: the parked buffer goes too.
        let away = recovering("away", Wire::WebSocket);
        table.insert(&away, None);
        table.remove(&away, &CloseReason::ClientGone, now);
        assert_eq!(table.drop_parked(&ids(&["away", "r", "none"])), ["away"]);
        assert_eq!(table.recovery_figures(), StoreFigures::default());
        assert_eq!(
            table.push(&Message::new(b"y"), ids(&["r"]), now).failed,
            ["r"]
        );
    }
}
