//! Service registration in etcd (COMPAT.md section 5): the node's key
//! `/<comet_service_name>/<rpc_addr>` on a lease kept alive from the control thread.
//!
//! Survives etcd being down at start (the node serves clients and registers once etcd
//! answers), lost leases (a new lease and the key again), and refuses to take over a key
//! another live process holds. A member that fails or hangs (a keepalive forwarded to a
//! leader that was cut off) costs no key: the same lease is renewed through the first
//! other member that answers ([`Registrar::reach`]), well within the TTL, so the key
//! never changes and the monitor has nothing to announce. Reports `registered` only
//! while etcd's last renewal covers now. Runs only on the control thread's runtime and
//! never makes a shard wait: a slow etcd delays only this task.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};

use super::Node;
use crate::config::Config;

/// Interval of HTTP/2 keepalive pings to etcd: above etcd's default minimum of 5 s.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(10);
/// The shortest deadline of one etcd call (see [`call_deadline`]).
const MIN_CALL_DEADLINE: Duration = Duration::from_secs(1);

/// The deadline of one registration call: a third of the lease TTL (at least 1 s), so
/// that one hung call (a keepalive forwarded to a leader that was cut off) leaves time
/// to fail over to another member and keep the lease before it expires. At the full TTL,
/// two hung calls in a row cost a healthy node its key.
fn call_deadline(ttl: Duration) -> Duration {
    (ttl / 3).max(MIN_CALL_DEADLINE)
}

/// The longest wait for one keepalive reply: half the keepalive interval, between 300 ms
/// and [`call_deadline`]. A healthy member answers in milliseconds, and a fail-over keeps
/// the same lease on another member (no key change, nothing for the monitor to see), so a
/// false alarm costs one log line while a hung stream costs no more than this. With the
/// call deadline alone (1 s at TTL 3 s) a keepalive hung on a cut-off leader left a 2.1 s
/// gap; at 500 ms the worst measured gap is in README's cluster section.
fn renew_deadline(ttl: Duration, interval: Duration) -> Duration {
    (interval / 2).clamp(MIN_RENEW_DEADLINE, call_deadline(ttl))
}
const MIN_RENEW_DEADLINE: Duration = Duration::from_millis(300);

/// Longest pause between attempts to reach etcd.
const MAX_RETRY: Duration = Duration::from_secs(1);
/// Extra time granted to a key held by a lease that is not ours before it is a conflict:
/// long enough for the lease of a node that just died (SIGKILL) to expire.
const TAKEOVER_GRACE: Duration = Duration::from_secs(2);
/// How long a member that failed is tried only after the others: longer than an etcd
/// election (1 s by default), short enough that a healed member is back in use soon.
const SKIP_FAILED_FOR: Duration = Duration::from_secs(5);
/// The longest lease etcd grants (`MaxLeaseTTL`, 9,000,000,000 s). A reply claiming more
/// comes from a broken or impersonated member, and `Instant + Duration` panics on
/// overflow: the TTL is clamped to it before any arithmetic.
const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// The configured etcd endpoints, used one at a time. etcd-client balances requests
/// over every endpoint it is given, so with one member down every other request fails;
/// talking to one member and moving to the next when it fails gives clean fail-over.
/// Members that failed recently are tried last ([`candidate_order`]).
#[derive(Debug)]
pub(crate) struct Endpoints {
    list: Vec<String>,
    current: Cell<usize>,
    failed_at: RefCell<Vec<Option<Instant>>>,
}

impl Endpoints {
    /// Endpoints in configured order (at least one).
    pub(crate) fn new(list: Vec<String>) -> Endpoints {
        assert!(!list.is_empty(), "at least one etcd endpoint");
        Endpoints {
            failed_at: RefCell::new(vec![None; list.len()]),
            list,
            current: Cell::new(0),
        }
    }

    /// Connects to the current endpoint.
    pub(crate) async fn connect(&self, timeout: Duration) -> Result<Client, etcd_client::Error> {
        connect_to(&self.list[self.current.get()], timeout).await
    }

    /// Marks the current endpoint failed and moves to the first one not known to fail.
    pub(crate) fn rotate(&self) {
        self.mark_failed(self.current.get());
        let order = self.order();
        self.current.set(order[0]);
    }

    /// Every endpoint, the current one first unless it failed recently, then the others
    /// in configured order after it, members that failed recently last.
    fn order(&self) -> Vec<usize> {
        candidate_order(
            self.current.get(),
            &self.failed_at.borrow(),
            Instant::now(),
            SKIP_FAILED_FOR,
        )
    }

    fn mark_failed(&self, index: usize) {
        self.failed_at.borrow_mut()[index] = Some(Instant::now());
    }

    /// Makes `index` the current endpoint: it just answered.
    fn use_member(&self, index: usize) {
        self.failed_at.borrow_mut()[index] = None;
        self.current.set(index);
    }
}

/// The order in which to try `failed_at.len()` members: starting at `current`, in
/// configured order, members that failed less than `skip_for` ago moved to the end
/// (those that failed longest ago first among them).
fn candidate_order(
    current: usize,
    failed_at: &[Option<Instant>],
    now: Instant,
    skip_for: Duration,
) -> Vec<usize> {
    let n = failed_at.len();
    let rotation = (0..n).map(|step| (current + step) % n);
    let recently_failed = |i: usize| failed_at[i].is_some_and(|t| now.duration_since(t) < skip_for);
    let mut order: Vec<usize> = rotation.clone().filter(|&i| !recently_failed(i)).collect();
    let mut failed: Vec<usize> = rotation.filter(|&i| recently_failed(i)).collect();
    failed.sort_by_key(|&i| failed_at[i]);
    order.extend(failed);
    order
}

async fn connect_to(endpoint: &str, timeout: Duration) -> Result<Client, etcd_client::Error> {
    // HTTP/2 pings no more often than a default etcd accepts
    // (`--grpc-keepalive-min-time=5s`): at 1 s it answered an idle watch stream with
    // GOAWAY ("too many pings") every 4-6 s. Dead connections are found by the
    // per-call deadlines anyway.
    let options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_require_leader(true)
        .with_keep_alive(HTTP2_KEEPALIVE, timeout);
    Client::connect([endpoint], Some(options)).await
}

/// A member that answered a probe: its client and what it said about our lease.
struct Reached {
    index: usize,
    client: Client,
    lease: ProbedLease,
    probe_sent: Instant,
}

/// What a probe learnt about the lease it was given.
enum ProbedLease {
    /// No lease was given.
    NotAsked,
    /// Renewed, for the TTL it was granted with: here is its keepalive stream.
    Kept(Box<(LeaseKeeper, LeaseKeepAliveStream)>),
    /// etcd does not know it any more (expired).
    Gone,
}

/// Connects to one member and proves it serves: renews `lease` through it, or (no lease)
/// reads `key`, which goes through the leader (`require_leader`).
async fn probe(
    index: usize,
    endpoint: String,
    key: String,
    lease: Option<i64>,
    deadline: Duration,
) -> Result<Reached, RegistrationError> {
    let attempt = async {
        let probe_sent = Instant::now();
        let mut client = connect_to(&endpoint, deadline).await?;
        let lease = match lease {
            // Opening the stream sends one keepalive and waits for its answer.
            Some(lease) => match client.lease_keep_alive(lease).await {
                Ok(stream) => ProbedLease::Kept(Box::new(stream)),
                Err(etcd_client::Error::LeaseKeepAliveError(why)) if why == "lease not found" => {
                    ProbedLease::Gone
                }
                Err(other) => return Err(other),
            },
            None => {
                client.get(key.as_str(), None).await?;
                ProbedLease::NotAsked
            }
        };
        Ok::<_, etcd_client::Error>(Reached {
            index,
            client,
            lease,
            probe_sent,
        })
    };
    match tokio::time::timeout(deadline, attempt).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RegistrationError::Timeout(deadline)),
    }
}

/// Why a registration session ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegistrationError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("lease {0:x} was lost")]
    LeaseLost(i64),
    /// Another live process holds this node's key: fatal.
    #[error(
        "etcd key {key} is held by another process (lease {lease:x}): two nodes must not claim one rpc_addr"
    )]
    Conflict { key: String, lease: i64 },
}

/// What the registrar reports in `Server.Status` (`registration`).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct RegistrationStatus {
    /// `connecting`, `registered`, `unknown (last keepalive N ms ago)`, `lost`,
    /// `conflict`, `handed_over` or `deregistered`. `registered` only while etcd's last
    /// answer to a keepalive (or the grant) still covers the lease's TTL, counted from
    /// when that keepalive was sent: past that etcd may have deleted the key, and the
    /// node says it does not know rather than claim it is registered.
    pub(crate) state: String,
    /// The node's key.
    pub(crate) key: String,
    /// Current lease, when registered.
    pub(crate) lease: Option<i64>,
    /// Times the key was put with a fresh lease since start.
    pub(crate) registrations: u64,
    /// Unix time of the last registration.
    pub(crate) registered_at: Option<u64>,
    /// The last error, if any.
    pub(crate) last_error: Option<String>,
    /// Milliseconds since etcd last renewed the lease (keepalive answered, or granted).
    pub(crate) last_keepalive_ms_ago: Option<u64>,
    /// The longest time between two renewals of the lease since start, in milliseconds:
    /// how close the node came to losing its key (normally `etcd_keepalive_interval`).
    pub(crate) longest_renewal_gap_ms: u64,
    /// Times the registration moved to another etcd member since start.
    pub(crate) fail_overs: u64,
}

/// The registrar's own record of its state, from which [`RegistrationStatus`] is made.
#[derive(Debug, Clone)]
struct State {
    phase: &'static str,
    lease: Option<i64>,
    registrations: u64,
    registered_at: Option<u64>,
    last_error: Option<String>,
    renewal: Option<Renewal>,
    longest_renewal_gap: Duration,
    fail_overs: u64,
}

/// The last time etcd renewed the lease.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    /// When the answer came.
    at: Instant,
    /// Until when that answer keeps the lease alive at least: the TTL etcd gave,
    /// counted from when the request was sent.
    valid_until: Instant,
}

/// The `state` field of [`RegistrationStatus`] at `now`.
fn reported_state(phase: &'static str, renewal: Option<Renewal>, now: Instant) -> String {
    match (phase, renewal) {
        ("registered", Some(renewal)) if now < renewal.valid_until => phase.to_owned(),
        ("registered", Some(renewal)) => format!(
            "unknown (last keepalive {} ms ago)",
            now.duration_since(renewal.at).as_millis()
        ),
        _ => phase.to_owned(),
    }
}

/// The load figures last written into the key, to decide when a rewrite is worth it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Published {
    /// Connected clients.
    pub(crate) connections: u64,
    /// The overloaded flag.
    pub(crate) overloaded: bool,
}

impl Published {
    /// Whether the load picture changed enough to rewrite the key: the overloaded flag
    /// flipped, or the connection count moved by 10% (at least 100) since last written.
    pub(crate) fn differs_meaningfully(&self, now: &Published) -> bool {
        let step = (self.connections / 10).max(100);
        self.overloaded != now.overloaded || self.connections.abs_diff(now.connections) >= step
    }
}

/// Keeps the node registered.
pub(crate) struct Registrar {
    endpoints: Endpoints,
    key: String,
    ttl: Duration,
    keepalive: Duration,
    state: RefCell<State>,
    current: RefCell<Option<(Client, i64)>>,
    previous_lease: Cell<Option<i64>>,
    /// The load figures in the key as last written.
    published: Cell<Option<Published>>,
    // Set once the node leaves etcd for good (graceful stop, hand-over): from then on no
    // session may register again. Without it, the keepalive of the revoked lease failed,
    // `run` took it for a lost lease and put the key back while the node drained (seen:
    // remove, add 0.85 s later, remove again 7.9 s after SIGTERM).
    stopped: Cell<bool>,
}

/// The pause between starting probes of successive members in a fail-over: the first
/// candidate (the current member, or the first not known to fail) usually answers
/// within it, and a hung one delays the next by no more than this.
const PROBE_STAGGER: Duration = Duration::from_millis(150);

impl Registrar {
    /// A registrar for this node; `None` when `etcd_addr` is empty (standalone).
    /// `inherited_lease` is a predecessor's lease on the key, taken over without a gap.
    pub(crate) fn new(config: &Config, inherited_lease: Option<i64>) -> Option<Registrar> {
        if config.etcd_endpoints.is_empty() {
            return None;
        }
        let key = format!("/{}/{}", config.comet_service_name, config.rpc_addr);
        Some(Registrar {
            endpoints: Endpoints::new(config.etcd_endpoints.clone()),
            state: RefCell::new(State {
                phase: "connecting",
                lease: None,
                registrations: 0,
                registered_at: None,
                last_error: None,
                renewal: None,
                longest_renewal_gap: Duration::ZERO,
                fail_overs: 0,
            }),
            key,
            ttl: config.etcd_lease_ttl,
            keepalive: config.etcd_keepalive_interval,
            current: RefCell::new(None),
            previous_lease: Cell::new(inherited_lease),
            published: Cell::new(None),
            stopped: Cell::new(false),
        })
    }

    /// The registration state.
    pub(crate) fn status(&self) -> RegistrationStatus {
        let state = self.state.borrow();
        let now = Instant::now();
        RegistrationStatus {
            state: reported_state(state.phase, state.renewal, now),
            key: self.key.clone(),
            lease: state.lease,
            registrations: state.registrations,
            registered_at: state.registered_at,
            last_error: state.last_error.clone(),
            last_keepalive_ms_ago: state
                .renewal
                .map(|r| now.duration_since(r.at).as_millis() as u64),
            longest_renewal_gap_ms: state.longest_renewal_gap.as_millis() as u64,
            fail_overs: state.fail_overs,
        }
    }

    /// Registers and stays registered; returns only on a conflict (fatal). After
    /// [`Registrar::stop`] or [`Registrar::deregister`] it never registers again.
    pub(crate) async fn run(&self, node: &Node) -> RegistrationError {
        let mut retry = Duration::from_millis(100);
        loop {
            if self.stopped.get() {
                return std::future::pending().await;
            }
            let error = match self.session(node).await {
                Err(conflict @ RegistrationError::Conflict { .. }) => {
                    self.set_phase("conflict", None);
                    self.set_error(&conflict);
                    return conflict;
                }
                Err(error) => error,
                Ok(never) => match never {},
            };
            self.current.borrow_mut().take();
            if self.stopped.get() {
                // The session ended because we left etcd: nothing to retry.
                return std::future::pending().await;
            }
            self.endpoints.rotate();
            if let RegistrationError::LeaseLost(_) = error {
                self.set_phase("lost", None);
            }
            let first_failure = self.state.borrow().last_error.is_none();
            if self.live_lease().is_some() {
                // The lease still holds the key: move to another member at once, before
                // it can expire.
                if first_failure {
                    tracing::warn!(key = %self.key, error = %error, "etcd member failed; keeping the lease through another member");
                } else {
                    tracing::debug!(key = %self.key, error = %error, "no etcd member renewed the lease yet");
                }
                self.state.borrow_mut().fail_overs += 1;
                retry = Duration::from_millis(100);
                // Members that refuse at once (no leader) must not make this a busy loop.
                tokio::time::sleep(PROBE_STAGGER).await;
            } else {
                if first_failure {
                    tracing::warn!(key = %self.key, error = %error, "etcd registration interrupted; retrying");
                } else {
                    tracing::debug!(key = %self.key, error = %error, "etcd still unavailable");
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
            self.set_error(&error);
        }
    }

    /// Stops registering without touching the key (a successor took it over).
    pub(crate) fn stop(&self) {
        self.stopped.set(true);
        self.current.borrow_mut().take();
        self.set_phase("handed_over", None);
    }

    /// Revokes the lease so the key disappears now (graceful shutdown); nothing registers
    /// again afterwards.
    pub(crate) async fn deregister(&self) {
        self.stopped.set(true);
        let taken = self.current.borrow_mut().take();
        let current = match (taken, self.live_lease()) {
            (Some(current), _) => Some(current),
            // Stopped between two members (a fail-over in progress): the lease may still
            // hold the key, so revoke it through the member to be tried next.
            (None, Some(lease)) => self
                .endpoints
                .connect(call_deadline(self.ttl))
                .await
                .ok()
                .map(|client| (client, lease)),
            (None, None) => None,
        };
        if let Some((mut client, lease)) = current {
            match tokio::time::timeout(call_deadline(self.ttl), client.lease_revoke(lease)).await {
                Ok(Ok(_)) => tracing::info!(key = %self.key, "etcd key removed"),
                Ok(Err(err)) => {
                    tracing::warn!(key = %self.key, error = %err, "could not revoke lease; key expires with its TTL")
                }
                Err(_) => {
                    tracing::warn!(key = %self.key, "etcd did not answer the revoke; key expires with its TTL")
                }
            }
        }
        self.set_phase("deregistered", None);
    }

    /// Our lease, while etcd's last renewal of it still covers now.
    fn live_lease(&self) -> Option<i64> {
        let state = self.state.borrow();
        let renewal = state.renewal?;
        (state.phase == "registered" && Instant::now() < renewal.valid_until)
            .then_some(self.previous_lease.get())
            .flatten()
    }

    /// The lease to try to keep: ours, once registered, even past its TTL by our clock,
    /// since etcd without a leader (quorum lost) expires no lease and its next leader
    /// extends them all; etcd answers TTL 0 when it is really gone.
    fn lease_to_keep(&self) -> Option<i64> {
        (self.state.borrow().phase == "registered")
            .then(|| self.previous_lease.get())
            .flatten()
    }

    async fn session(&self, node: &Node) -> Result<std::convert::Infallible, RegistrationError> {
        let live = self.lease_to_keep();
        let reached = self.reach(live).await?;
        self.endpoints.use_member(reached.index);
        let mut client = reached.client;
        if self.stopped.get() {
            // A stop came while no member was current, so it revoked nothing: the lease
            // must not outlive the node's decision to leave.
            if let Some(lease) = live {
                let _ = self.timed(client.lease_revoke(lease)).await;
            }
            return Err(RegistrationError::LeaseLost(live.unwrap_or(0)));
        }
        let (lease, mut keeper, mut replies) = match (live, reached.lease) {
            (Some(lease), ProbedLease::Kept(stream)) => {
                let (keeper, replies) = *stream;
                self.renewed(reached.probe_sent, self.ttl.as_secs() as i64);
                tracing::info!(key = %self.key, lease = format!("{lease:x}"), endpoint = %self.endpoints.list[reached.index], "lease kept through another etcd member");
                *self.current.borrow_mut() = Some((client.clone(), lease));
                (lease, keeper, replies)
            }
            (_, probed) => {
                if let ProbedLease::Gone = probed {
                    self.set_phase("lost", None);
                    tracing::warn!(key = %self.key, "etcd lease expired; registering again");
                }
                let lease = self.register(&mut client, node).await?;
                let (keeper, replies) = self.timed(client.lease_keep_alive(lease)).await?;
                (lease, keeper, replies)
            }
        };
        let renew_within = renew_deadline(self.ttl, self.keepalive);
        let mut ticker = tokio::time::interval(self.keepalive);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let sent = Instant::now();
            let renewal = async {
                keeper.keep_alive().await?;
                replies.message().await
            };
            let reply = match tokio::time::timeout(renew_within, renewal).await {
                Ok(reply) => reply?,
                Err(_) => return Err(RegistrationError::Timeout(renew_within)),
            };
            match reply {
                Some(reply) if reply.ttl() > 0 => self.renewed(sent, reply.ttl()),
                _ => return Err(RegistrationError::LeaseLost(lease)),
            }
            self.refresh_value(&mut client, node, lease).await?;
        }
    }

    /// Finds a member that serves: probes the candidates in [`Endpoints::order`], each
    /// [`PROBE_STAGGER`] after the one before, and takes the first to answer, so one
    /// hung member costs a stagger, not a deadline. With `lease`, the probe renews it.
    async fn reach(&self, lease: Option<i64>) -> Result<Reached, RegistrationError> {
        // While the lease may still hold the key, a round of probes that all fail is
        // followed by another at once: a short deadline makes the rounds short, so the
        // lease is renewed soon after etcd has a leader again.
        let deadline = match self.live_lease() {
            Some(_) => renew_deadline(self.ttl, self.keepalive),
            None => call_deadline(self.ttl),
        };
        let mut probes = tokio::task::JoinSet::new();
        for (rank, index) in self.endpoints.order().into_iter().enumerate() {
            let endpoint = self.endpoints.list[index].clone();
            let key = self.key.clone();
            let delay = PROBE_STAGGER * rank as u32;
            probes.spawn(async move {
                tokio::time::sleep(delay).await;
                (index, probe(index, endpoint, key, lease, deadline).await)
            });
        }
        let mut last_error = RegistrationError::Timeout(deadline);
        while let Some(joined) = probes.join_next().await {
            match joined {
                Ok((_, Ok(reached))) => return Ok(reached),
                Ok((index, Err(error))) => {
                    self.endpoints.mark_failed(index);
                    last_error = error;
                }
                Err(panicked) => tracing::error!(error = %panicked, "etcd probe failed"),
            }
        }
        Err(last_error)
    }

    /// Grants a fresh lease and puts the key on it.
    async fn register(&self, client: &mut Client, node: &Node) -> Result<i64, RegistrationError> {
        let asked = Instant::now();
        let lease = self
            .timed(client.lease_grant(self.ttl.as_secs() as i64, None))
            .await?
            .id();
        // Held from the grant on, so that a stop arriving while the claim is in flight
        // revokes this lease too and cannot leave a key behind.
        *self.current.borrow_mut() = Some((client.clone(), lease));
        let (value, published) = node.registration_value();
        self.claim(client, lease, &value).await?;
        self.published.set(Some(published));
        self.previous_lease.set(Some(lease));
        self.registered(lease, asked);
        Ok(lease)
    }

    /// Rewrites the key when the load picture changed meaningfully.
    async fn refresh_value(
        &self,
        client: &mut Client,
        node: &Node,
        lease: i64,
    ) -> Result<(), RegistrationError> {
        let (value, now) = node.registration_value();
        if self
            .published
            .get()
            .is_some_and(|published| !published.differs_meaningfully(&now))
        {
            return Ok(());
        }
        let put = client.put(
            self.key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        );
        self.timed(put).await?;
        tracing::info!(key = %self.key, connections = now.connections, overloaded = now.overloaded, "etcd value refreshed");
        self.published.set(Some(now));
        Ok(())
    }

    /// Puts the key if nobody holds it. A key held by our own earlier lease is taken
    /// over; one held by another lease is waited on for one TTL (a node that just died
    /// leaves its key until its lease expires), then is a conflict.
    async fn claim(
        &self,
        client: &mut Client,
        lease: i64,
        value: &str,
    ) -> Result<(), RegistrationError> {
        let deadline = Instant::now() + self.ttl + TAKEOVER_GRACE;
        let mut logged = false;
        loop {
            let put = TxnOp::put(
                self.key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            );
            let txn = Txn::new()
                .when([Compare::create_revision(
                    self.key.as_str(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([put])
                .or_else([TxnOp::get(self.key.as_str(), None)]);
            let reply = self.timed(client.txn(txn)).await?;
            if reply.succeeded() {
                return Ok(());
            }
            let holder = reply
                .op_responses()
                .into_iter()
                .find_map(|op| match op {
                    TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.lease()),
                    _ => None,
                })
                .unwrap_or(0);
            if holder != 0 && Some(holder) == self.previous_lease.get() {
                let put = client.put(
                    self.key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                );
                self.timed(put).await?;
                let _ = self.timed(client.lease_revoke(holder)).await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(RegistrationError::Conflict {
                    key: self.key.clone(),
                    lease: holder,
                });
            }
            if !logged {
                tracing::warn!(key = %self.key, lease = format!("{holder:x}"), "etcd key held by another lease; waiting for it to expire");
                logged = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Bounds one etcd call by [`call_deadline`].
    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistrationError> {
        let deadline = call_deadline(self.ttl);
        match tokio::time::timeout(deadline, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RegistrationError::Timeout(deadline)),
        }
    }

    fn registered(&self, lease: i64, asked: Instant) {
        let mut state = self.state.borrow_mut();
        state.registrations += 1;
        state.registered_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        state.last_error = None;
        drop(state);
        self.set_phase("registered", Some(lease));
        self.renewed(asked, self.ttl.as_secs() as i64);
        tracing::info!(key = %self.key, lease = format!("{lease:x}"), ttl = ?self.ttl, "registered in etcd");
    }

    /// etcd renewed the lease for `ttl` seconds in answer to a request sent at `sent`.
    fn renewed(&self, sent: Instant, ttl: i64) {
        let now = Instant::now();
        let mut state = self.state.borrow_mut();
        if let Some(last) = state.renewal {
            state.longest_renewal_gap = state.longest_renewal_gap.max(now - last.at);
        }
        state.renewal = Some(Renewal {
            at: now,
            valid_until: lease_valid_until(sent, ttl),
        });
        state.last_error = None;
    }

    fn set_phase(&self, phase: &'static str, lease: Option<i64>) {
        let mut state = self.state.borrow_mut();
        state.phase = phase;
        state.lease = lease;
    }

    fn set_error(&self, error: &RegistrationError) {
        self.state.borrow_mut().last_error = Some(error.to_string());
    }
}

/// Until when a lease renewed for `ttl` seconds (as etcd answered a request sent at
/// `sent`) holds; never panics, whatever the answer.
fn lease_valid_until(sent: Instant, ttl: i64) -> Instant {
    let ttl = Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL_SECS) as u64);
    sent.checked_add(ttl).unwrap_or(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_lease_ttl_etcd_answers_is_taken_without_panicking() {
        let sent = Instant::now();
        assert_eq!(lease_valid_until(sent, 3), sent + Duration::from_secs(3));
        assert_eq!(lease_valid_until(sent, -5), sent);
        assert!(lease_valid_until(sent, i64::MAX) >= sent);
    }

    #[test]
    fn one_call_takes_a_third_of_the_lease_at_most() {
        assert_eq!(
            call_deadline(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
        assert_eq!(
            call_deadline(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(call_deadline(Duration::from_secs(2)), MIN_CALL_DEADLINE);
    }

    #[test]
    fn a_keepalive_waits_half_an_interval_within_bounds() {
        let ttl = Duration::from_secs(3);
        assert_eq!(
            renew_deadline(ttl, Duration::from_secs(1)),
            Duration::from_millis(500)
        );
        assert_eq!(
            renew_deadline(ttl, Duration::from_millis(200)),
            MIN_RENEW_DEADLINE
        );
        assert_eq!(
            renew_deadline(ttl, Duration::from_secs(10)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn members_that_failed_recently_are_tried_last() {
        let now = Instant::now();
        let skip = Duration::from_secs(5);
        let healthy = [None, None, None];
        assert_eq!(candidate_order(0, &healthy, now, skip), vec![0, 1, 2]);
        assert_eq!(candidate_order(2, &healthy, now, skip), vec![2, 0, 1]);
        // Member 1 (the next in line) failed 1 s ago, member 0 (current) just now.
        let failed = [Some(now), Some(now - Duration::from_secs(1)), None];
        assert_eq!(candidate_order(0, &failed, now, skip), vec![2, 1, 0]);
        // A failure older than `skip` is forgotten.
        let old = [None, Some(now - Duration::from_secs(6)), None];
        assert_eq!(candidate_order(0, &old, now, skip), vec![0, 1, 2]);
        let single = [Some(now)];
        assert_eq!(candidate_order(0, &single, now, skip), vec![0]);
    }

    #[test]
    fn registered_only_while_the_last_renewal_covers_now() {
        let at = Instant::now();
        let renewal = Renewal {
            at,
            valid_until: at + Duration::from_secs(3),
        };
        let soon = at + Duration::from_millis(2900);
        let late = at + Duration::from_millis(3200);
        assert_eq!(
            reported_state("registered", Some(renewal), soon),
            "registered"
        );
        assert_eq!(
            reported_state("registered", Some(renewal), late),
            "unknown (last keepalive 3200 ms ago)"
        );
        assert_eq!(reported_state("connecting", None, late), "connecting");
        assert_eq!(
            reported_state("deregistered", Some(renewal), soon),
            "deregistered"
        );
    }

    #[test]
    fn small_moves_do_not_rewrite_the_key() {
        let last = Published {
            connections: 5000,
            overloaded: false,
        };
        let near = Published {
            connections: 5300,
            overloaded: false,
        };
        let far = Published {
            connections: 5600,
            overloaded: false,
        };
        let flipped = Published {
            connections: 5000,
            overloaded: true,
        };
        assert!(!last.differs_meaningfully(&near));
        assert!(last.differs_meaningfully(&far));
        assert!(last.differs_meaningfully(&flipped));
    }
}
