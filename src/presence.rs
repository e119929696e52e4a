//! Presence callbacks (`online`, `offline`) on worker threads ("lanes"), retried with
//! backoff, in order per conn_id, and in order across a zero-downtime restart.
//!
//! A conn_id always goes to the same lane, so its `offline` never overtakes its `online`.
//! Across a hand-over the order between the two processes is kept by the predecessor's
//! notices (`presence_gate`): a successor's lane holds back a conn_id's events until the
//! predecessor has delivered that conn_id's `offline`.
//!
//! Every call here blocks (ureq), so nothing in this module runs on a shard: shards only
//! queue events, which never blocks.

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::json;

use crate::callback::CallbackClient;
use crate::presence_gate::{Gate, Notice};

/// Which presence callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PresenceKind {
    /// The client's upgrade completed.
    Online,
    /// The client's connection is gone.
    Offline,
}

impl PresenceKind {
    fn method(self) -> &'static str {
        match self {
            PresenceKind::Online => "online",
            PresenceKind::Offline => "offline",
        }
    }
}

struct PresenceEvent {
    kind: PresenceKind,
    conn_id: String,
    info: String,
    /// Queued once a successor served: its delivery is a `done` notice. An `offline`
    /// queued before is not: it belongs to a session the hand-over's list does not name
    /// (gone by then), and telling it would release a held conn_id whose listed session
    /// has yet to end.
    tells_successor: bool,
}

impl PresenceEvent {
    /// What the event holds while queued: its strings and its slot in the lane's channel.
    fn bytes(&self) -> usize {
        self.conn_id.len() + self.info.len() + std::mem::size_of::<Self>() + 16
    }
}

/// Where a predecessor writes its notices to its successor (shared by its lanes).
type NoticePipe = Arc<Mutex<std::fs::File>>;

/// What a lane is told besides events.
enum Control {
    /// Successor: the predecessor holds this conn_id.
    Hold(String),
    /// Successor: the predecessor delivered this conn_id's `offline`.
    Done(String),
    /// Successor: the predecessor's list and lanes are all in.
    Open,
    /// Successor: the predecessor is gone.
    PredecessorGone,
    /// Predecessor: a successor took over; report each `offline` delivered from now on.
    HandedOver(NoticePipe),
    /// The node stops and no shard is left to queue events: deliver what is queued
    /// (held ones included), then end.
    Finish,
}

/// Queues presence callbacks. Cloneable handle; dropping every handle and calling
/// [`PresenceWorkers::join`] drains what is queued.
#[derive(Clone)]
pub(crate) struct Presence {
    events: Arc<[Sender<PresenceEvent>]>,
    routes: Routes,
    /// False with no message server: events are not even queued. Queuing them only for
    /// the lane to drop them cost 36% of a handshake's CPU (the presence thread woken
    /// per connect, and the shard's wake of it), measured with `comet-bench compare`.
    reporting: bool,
    /// Bytes of the events queued and not yet delivered, over every lane.
    queued_bytes: Arc<AtomicUsize>,
    /// `presence_queue_bytes`: past it, no new session is admitted ([`Presence::is_backlogged`]).
    limit: usize,
    /// Set when a successor serves ([`Presence::successor_serving`]).
    successor: Arc<AtomicBool>,
}

/// The threads behind a [`Presence`].
pub(crate) struct PresenceWorkers {
    threads: Vec<JoinHandle<()>>,
}

impl Presence {
    /// Starts `workers` lanes. With no client (no message server configured) nothing is
    /// reported. `predecessor`: the read end of a predecessor's
    /// notices (a successor of a hand-over); its lanes then wait for them.
    pub(crate) fn start(
        client: Option<CallbackClient>,
        workers: usize,
        retries: u32,
        queue_bytes: usize,
        predecessor: Option<std::fs::File>,
    ) -> (Presence, PresenceWorkers) {
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let mut events = Vec::with_capacity(workers);
        let mut controls = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        let now = Instant::now();
        for index in 0..workers {
            let (event_tx, event_rx) = crossbeam_channel::unbounded();
            let (control_tx, control_rx) = crossbeam_channel::unbounded();
            events.push(event_tx);
            controls.push(control_tx);
            let gate = match predecessor {
                Some(_) => Gate::waiting_for_predecessor(now),
                None => Gate::open(),
            };
            let lane = Lane {
                index,
                client: client.clone(),
                retries,
                gate,
                notices: None,
                queued_bytes: Arc::clone(&queued_bytes),
            };
            let thread = std::thread::Builder::new()
                .name(format!("presence-{index}"))
                .spawn(move || lane.run(event_rx, control_rx))
                .expect("spawning a presence thread");
            threads.push(thread);
        }
        let presence = Presence {
            reporting: client.is_some(),
            queued_bytes,
            limit: queue_bytes,
            successor: Arc::new(AtomicBool::new(false)),
            events: events.into(),
            routes: Routes {
                controls: controls.into(),
                hasher: ahash::RandomState::new(),
            },
        };
        if let Some(pipe) = predecessor {
            // The reader holds the lanes' control channels and the hash that picks a
            // conn_id's lane, not the event senders: shutdown is not held up by it.
            let routes = presence.routes.clone();
            // Detached: it ends when the predecessor closes the pipe (it exits).
            let _ = std::thread::Builder::new()
                .name("presence-order".into())
                .spawn(move || read_notices(pipe, &routes));
        }
        (presence, PresenceWorkers { threads })
    }

    /// Events queued and not yet delivered, over every lane (held ones included).
    pub(crate) fn backlog(&self) -> usize {
        self.events.iter().map(Sender::len).sum()
    }

    /// Whether the events waiting for the message server hold more than
    /// `presence_queue_bytes`: new sessions are then refused until it catches up. An
    /// `offline` is always queued, so the queue holds at most about twice the bound (a
    /// client cycling RESP `SUBSCRIBE`/`UNSUBSCRIBE` on one connection queued 21,000
    /// events a second against a message server answering in 20 ms: +2.6 GB in 20 s).
    pub(crate) fn is_backlogged(&self) -> bool {
        self.queued_bytes.load(Ordering::Relaxed) > self.limit
    }

    /// Queues a presence callback; never blocks.
    pub(crate) fn report(&self, kind: PresenceKind, conn_id: &str, info: &str) {
        if !self.reporting {
            return;
        }
        let event = PresenceEvent {
            kind,
            conn_id: conn_id.to_owned(),
            info: info.to_owned(),
            tells_successor: self.successor.load(Ordering::Acquire),
        };
        let bytes = event.bytes();
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.events[self.routes.lane_of(conn_id)]
            .send(event)
            .is_err()
        {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            tracing::error!(
                conn_id = ?conn_id,
                method = kind.method(),
                "presence worker gone; callback lost"
            );
        }
    }

    /// A successor serves: each `offline` queued from now on is told to it once
    /// delivered ([`Presence::hand_over`]). Call before the held list is taken.
    pub(crate) fn successor_serving(&self) {
        self.successor.store(true, Ordering::Release);
    }

    /// The node stops: every lane delivers what is queued, then ends (see
    /// [`PresenceWorkers::join`]). Call once no shard is left to queue events.
    pub(crate) fn finish(&self) {
        self.routes.to_every_lane(|| Control::Finish);
    }

    /// A successor took over: tells every lane to report its deliveries to `pipe`, and
    /// writes `held` there, the conn_ids whose `offline` is still to come once the
    /// shards stopped announcing (after [`Presence::successor_serving`]).
    /// `held` must be taken before this call (each lane, once told, delivers what is
    /// queued and then says it is ready: with the list taken first, every `offline` of a
    /// conn_id not on it was queued by then). Blocks on the pipe: call it off the control
    /// thread's runtime.
    pub(crate) fn hand_over(&self, pipe: std::fs::File, held: Vec<String>) {
        let pipe: NoticePipe = Arc::new(Mutex::new(pipe));
        self.routes
            .to_every_lane(|| Control::HandedOver(Arc::clone(&pipe)));
        let mut text = String::new();
        for conn_id in held {
            text.push_str(&Notice::Hold(conn_id).line());
        }
        text.push_str(&Notice::Listed(self.events.len()).line());
        write_notice_text(&pipe, &text);
    }
}

/// The lanes' control channels and the hash that picks a conn_id's lane: one lane per
/// conn_id for its events and its notices alike.
#[derive(Clone)]
struct Routes {
    controls: Arc<[Sender<Control>]>,
    hasher: ahash::RandomState,
}

impl Routes {
    fn lane_of(&self, conn_id: &str) -> usize {
        (self.hasher.hash_one(conn_id) % self.controls.len() as u64) as usize
    }

    fn to_lane_of(&self, conn_id: &str, control: Control) {
        let _ = self.controls[self.lane_of(conn_id)].send(control);
    }

    fn to_every_lane(&self, control: impl Fn() -> Control) {
        for lane in self.controls.iter() {
            let _ = lane.send(control());
        }
    }
}

/// The successor's side of the pipe: routes each notice to its lane until the
/// predecessor closes it.
fn read_notices(pipe: std::fs::File, routes: &Routes) {
    let mut listed = None;
    let mut lanes_ready = 0;
    let mut opened = false;
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        match Notice::parse(&line) {
            Some(Notice::Hold(conn_id)) => {
                routes.to_lane_of(&conn_id.clone(), Control::Hold(conn_id))
            }
            Some(Notice::Done(conn_id)) => {
                routes.to_lane_of(&conn_id.clone(), Control::Done(conn_id))
            }
            Some(Notice::Listed(lanes)) => listed = Some(lanes),
            Some(Notice::LaneReady(_)) => lanes_ready += 1,
            None => tracing::warn!(line = ?line, "unreadable notice from the predecessor"),
        }
        if !opened && listed.is_some_and(|lanes| lanes_ready >= lanes) {
            opened = true;
            tracing::info!(
                "predecessor's presence list received: holding its conn_ids until their offline"
            );
            routes.to_every_lane(|| Control::Open);
        }
    }
    tracing::info!("predecessor gone: presence order released");
    routes.to_every_lane(|| Control::PredecessorGone);
}

fn write_notice_text(pipe: &NoticePipe, text: &str) {
    let mut pipe = pipe.lock().unwrap_or_else(|e| e.into_inner());
    // A successor that died cannot be told anything; its absence is not our failure.
    let _ = pipe.write_all(text.as_bytes());
}

impl PresenceWorkers {
    /// Waits until every queued event is delivered or given up. Call after
    /// [`Presence::finish`], or after every [`Presence`] handle is dropped.
    pub(crate) fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// How often a lane that holds something checks its deadlines.
const GATE_TICK: Duration = Duration::from_millis(100);

/// One presence worker.
struct Lane {
    index: usize,
    client: Option<CallbackClient>,
    retries: u32,
    gate: Gate<PresenceEvent>,
    notices: Option<NoticePipe>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Lane {
    fn run(mut self, events: Receiver<PresenceEvent>, controls: Receiver<Control>) {
        loop {
            let tick = if self.gate.is_waiting() {
                GATE_TICK
            } else {
                Duration::from_secs(3600)
            };
            crossbeam_channel::select! {
                recv(events) -> event => match event {
                    Ok(event) => {
                        let conn_id = event.conn_id.clone();
                        let ready = self.gate.event(&conn_id, event);
                        self.deliver(ready);
                    }
                    // Every handle dropped: what is held is released, then the lane ends.
                    Err(_) => {
                        let held = self.gate.release_all();
                        self.deliver(held);
                        return;
                    }
                },
                recv(controls) -> control => match control {
                    Ok(Control::Finish) => {
                        self.deliver_queued(&events);
                        let held = self.gate.release_all();
                        self.deliver(held);
                        return;
                    }
                    Ok(control) => self.control(control, &events),
                    Err(_) => {}
                },
                default(tick) => {
                    let due = self.gate.tick(Instant::now());
                    self.deliver(due);
                }
            }
        }
    }

    fn control(&mut self, control: Control, events: &Receiver<PresenceEvent>) {
        let ready = match control {
            Control::Hold(conn_id) => {
                self.gate.hold(conn_id, Instant::now());
                Vec::new()
            }
            Control::Done(conn_id) => self.gate.done(&conn_id),
            Control::Open => self.gate.open_now(),
            Control::PredecessorGone => self.gate.release_all(),
            // The loop ends the lane on it, before this.
            Control::Finish => Vec::new(),
            Control::HandedOver(pipe) => {
                // The held list was taken before this notice was sent, so every
                // `offline` of a conn_id missing from it is already queued here: deliver
                // them (reporting each from now on), then say this lane is ready.
                self.notices = Some(Arc::clone(&pipe));
                self.deliver_queued(events);
                write_notice_text(&pipe, &Notice::LaneReady(self.index).line());
                Vec::new()
            }
        };
        self.deliver(ready);
    }

    /// Delivers (or, through the gate, holds) every event queued now.
    fn deliver_queued(&mut self, events: &Receiver<PresenceEvent>) {
        for _ in 0..events.len() {
            let Ok(event) = events.try_recv() else { break };
            let conn_id = event.conn_id.clone();
            let ready = self.gate.event(&conn_id, event);
            self.deliver(ready);
        }
    }

    fn deliver(&self, events: Vec<PresenceEvent>) {
        for event in events {
            self.deliver_one(&event);
            self.queued_bytes
                .fetch_sub(event.bytes(), Ordering::Relaxed);
            if event.kind == PresenceKind::Offline
                && event.tells_successor
                && let Some(pipe) = &self.notices
            {
                write_notice_text(pipe, &Notice::Done(event.conn_id).line());
            }
        }
    }

    fn deliver_one(&self, event: &PresenceEvent) {
        let Some(client) = &self.client else {
            tracing::debug!(conn_id = ?event.conn_id, method = event.kind.method(), "no rpc_api_url: callback skipped");
            return;
        };
        let args = [&event.conn_id, &event.info, client.rpc_addr()].map(|a| json!(a));
        // Failures are logged inside; a lost presence event is not fatal to anyone.
        let _ = client.call_with_retries(event.kind.method(), &args, self.retries, &event.conn_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a predecessor wrote to its successor, one notice per line.
    fn notices_in(path: &std::path::Path) -> Vec<Notice> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(Notice::parse)
            .collect()
    }

    #[test]
    fn only_offlines_queued_once_a_successor_serves_are_told_to_it() {
        // A message server that never answers: each call ends at its 20 ms timeout, so
        // the events below are still queued when the lane is told of the successor.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = CallbackClient::new(
            &format!("http://{}/", silent.local_addr().unwrap()),
            "test",
            "127.0.0.1:1",
            Duration::from_millis(20),
            Arc::default(),
        );
        let (presence, workers) = Presence::start(Some(client), 1, 0, 1 << 20, None);
        for other in 0..10 {
            presence.report(PresenceKind::Online, &format!("other{other}"), "");
        }
        // A session gone before the hand-over: its offline is not the one that `a`'s
        // listed session will report, and must not release the successor's hold on `a`.
        presence.report(PresenceKind::Offline, "a", "");
        presence.successor_serving();
        presence.report(PresenceKind::Online, "b", "");
        presence.report(PresenceKind::Offline, "b", "");
        let path = std::env::temp_dir().join(format!("comet-notices-{}", std::process::id()));
        let pipe = std::fs::File::create(&path).unwrap();
        presence.hand_over(pipe, vec!["a".into(), "b".into()]);
        presence.report(PresenceKind::Offline, "a", "");
        presence.finish();
        workers.join();
        let notices = notices_in(&path);
        let _ = std::fs::remove_file(&path);
        let done: Vec<&Notice> = notices
            .iter()
            .filter(|n| matches!(n, Notice::Done(_)))
            .collect();
        assert_eq!(
            done,
            [&Notice::Done("b".into()), &Notice::Done("a".into())],
            "{notices:?}"
        );
        for expected in [
            Notice::Hold("a".into()),
            Notice::Hold("b".into()),
            Notice::Listed(1),
            Notice::LaneReady(0),
        ] {
            assert!(notices.contains(&expected), "{notices:?}");
        }
    }
}
