//! Service registration in etcd (COMPAT.md section 5): the node's key
//! `/<comet_service_name>/<rpc_addr>` on a lease kept alive from the control thread.
//!
//! Survives etcd being down at start (the node serves clients and registers once etcd
//! answers), lost leases (a new lease and the key again), and refuses to take over a key
//! another live process holds. Runs only on the control thread's runtime and never makes
//! a shard wait: a slow etcd delays only this task.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
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

/// Longest pause between attempts to reach etcd.
const MAX_RETRY: Duration = Duration::from_secs(1);
/// Extra time granted to a key held by a lease that is not ours before it is a conflict:
/// long enough for the lease of a node that just died (SIGKILL) to expire.
const TAKEOVER_GRACE: Duration = Duration::from_secs(2);

/// The configured etcd endpoints, used one at a time. etcd-client balances requests
/// over every endpoint it is given, so with one member down every other request fails;
/// talking to one member and moving to the next when it fails gives clean fail-over.
#[derive(Debug)]
pub struct Endpoints {
    list: Vec<String>,
    current: Cell<usize>,
}

impl Endpoints {
    /// Endpoints in configured order (at least one).
    pub fn new(list: Vec<String>) -> Endpoints {
        assert!(!list.is_empty(), "at least one etcd endpoint");
        Endpoints {
            list,
            current: Cell::new(0),
        }
    }

    /// Connects to the current endpoint.
    pub async fn connect(&self, timeout: Duration) -> Result<Client, etcd_client::Error> {
        // HTTP/2 pings no more often than a default etcd accepts
        // (`--grpc-keepalive-min-time=5s`): at 1 s it answered an idle watch stream with
        // GOAWAY ("too many pings") every 4-6 s. Dead connections are found by the
        // per-call deadlines anyway.
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_require_leader(true)
            .with_keep_alive(HTTP2_KEEPALIVE, timeout);
        Client::connect([self.list[self.current.get()].as_str()], Some(options)).await
    }

    /// Moves to the next endpoint after a failure.
    pub fn rotate(&self) {
        self.current.set((self.current.get() + 1) % self.list.len());
    }
}

/// Why a registration session ended.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
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

/// What the registrar reports in `Server.Status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegistrationStatus {
    /// `connecting`, `registered`, `lost`, `conflict` or `deregistered`.
    pub state: &'static str,
    /// The node's key.
    pub key: String,
    /// Current lease, when registered.
    pub lease: Option<i64>,
    /// Times the key was put with a fresh lease since start.
    pub registrations: u64,
    /// Unix time of the last registration.
    pub registered_at: Option<u64>,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// The load figures last written into the key, to decide when a rewrite is worth it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Connected clients.
    pub connections: u64,
    /// The overloaded flag.
    pub overloaded: bool,
}

impl Published {
    /// Whether the load picture changed enough to rewrite the key: the overloaded flag
    /// flipped, or the connection count moved by 10% (at least 100) since last written.
    pub fn differs_meaningfully(&self, now: &Published) -> bool {
        let step = (self.connections / 10).max(100);
        self.overloaded != now.overloaded || self.connections.abs_diff(now.connections) >= step
    }
}

/// Keeps the node registered.
pub struct Registrar {
    endpoints: Endpoints,
    key: String,
    ttl: Duration,
    keepalive: Duration,
    status: RefCell<RegistrationStatus>,
    current: RefCell<Option<(Client, i64)>>,
    previous_lease: Cell<Option<i64>>,
    // Set once the node leaves etcd for good (graceful stop, hand-over): from then on no
    // session may register again. Without it, the keepalive of the revoked lease failed,
    // `run` took it for a lost lease and put the key back while the node drained (seen:
    // remove, add 0.85 s later, remove again 7.9 s after SIGTERM).
    stopped: Cell<bool>,
}

impl Registrar {
    /// A registrar for this node; `None` when `etcd_addr` is empty (standalone).
    /// `inherited_lease` is a predecessor's lease on the key, taken over without a gap.
    pub fn new(config: &Config, inherited_lease: Option<i64>) -> Option<Registrar> {
        if config.etcd_endpoints.is_empty() {
            return None;
        }
        let key = format!("/{}/{}", config.comet_service_name, config.rpc_addr);
        Some(Registrar {
            endpoints: Endpoints::new(config.etcd_endpoints.clone()),
            status: RefCell::new(RegistrationStatus {
                state: "connecting",
                key: key.clone(),
                lease: None,
                registrations: 0,
                registered_at: None,
                last_error: None,
            }),
            key,
            ttl: config.etcd_lease_ttl,
            keepalive: config.etcd_keepalive_interval,
            current: RefCell::new(None),
            previous_lease: Cell::new(inherited_lease),
            stopped: Cell::new(false),
        })
    }

    /// The registration state.
    pub fn status(&self) -> RegistrationStatus {
        self.status.borrow().clone()
    }

    /// Registers and stays registered; returns only on a conflict (fatal). After
    /// [`Registrar::stop`] or [`Registrar::deregister`] it never registers again.
    pub async fn run(&self, node: &Node) -> RegistrationError {
        let mut retry = Duration::from_millis(100);
        loop {
            if self.stopped.get() {
                return std::future::pending().await;
            }
            let registrations_before = self.status.borrow().registrations;
            let error = match self.session(node).await {
                Err(conflict @ RegistrationError::Conflict { .. }) => {
                    self.set_state("conflict", None, Some(conflict.to_string()));
                    return conflict;
                }
                Err(error) => error,
                Ok(never) => match never {},
            };
            if self.status.borrow().registrations > registrations_before {
                retry = Duration::from_millis(100);
            }
            self.current.borrow_mut().take();
            if self.stopped.get() {
                // The session ended because we left etcd: nothing to retry.
                return std::future::pending().await;
            }
            self.endpoints.rotate();
            let was = self.status.borrow().state;
            let next = if was == "registered" { "lost" } else { was };
            if was == "registered" || self.status.borrow().last_error.is_none() {
                tracing::warn!(key = %self.key, error = %error, "etcd registration interrupted; retrying");
            } else {
                tracing::debug!(key = %self.key, error = %error, "etcd still unavailable");
            }
            self.set_state(next, None, Some(error.to_string()));
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(MAX_RETRY);
        }
    }

    /// Stops registering without touching the key (a successor took it over).
    pub fn stop(&self) {
        self.stopped.set(true);
        self.current.borrow_mut().take();
        self.set_state("handed_over", None, None);
    }

    /// Revokes the lease so the key disappears now (graceful shutdown); nothing registers
    /// again afterwards.
    pub async fn deregister(&self) {
        self.stopped.set(true);
        let current = self.current.borrow_mut().take();
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
        self.set_state("deregistered", None, None);
    }

    async fn session(&self, node: &Node) -> Result<std::convert::Infallible, RegistrationError> {
        let mut client = self
            .timed(self.endpoints.connect(call_deadline(self.ttl)))
            .await?;
        let lease = self
            .timed(client.lease_grant(self.ttl.as_secs() as i64, None))
            .await?
            .id();
        // Held from the grant on, so that a stop arriving while the claim is in flight
        // revokes this lease too and cannot leave a key behind.
        *self.current.borrow_mut() = Some((client.clone(), lease));
        let (value, mut published) = node.registration_value();
        self.claim(&mut client, lease, &value).await?;
        self.previous_lease.set(Some(lease));
        self.registered(lease);

        let (mut keeper, mut replies) = self.timed(client.lease_keep_alive(lease)).await?;
        let mut ticker = tokio::time::interval(self.keepalive);
        loop {
            ticker.tick().await;
            self.timed(keeper.keep_alive()).await?;
            match self.timed(replies.message()).await? {
                Some(reply) if reply.ttl() > 0 => {}
                _ => return Err(RegistrationError::LeaseLost(lease)),
            }
            let (value, now) = node.registration_value();
            if published.differs_meaningfully(&now) {
                let put = client.put(
                    self.key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                );
                self.timed(put).await?;
                tracing::info!(key = %self.key, connections = now.connections, overloaded = now.overloaded, "etcd value refreshed");
                published = now;
            }
        }
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

    fn registered(&self, lease: i64) {
        let mut status = self.status.borrow_mut();
        status.registrations += 1;
        status.registered_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        drop(status);
        self.set_state("registered", Some(lease), None);
        tracing::info!(key = %self.key, lease = format!("{lease:x}"), ttl = ?self.ttl, "registered in etcd");
    }

    fn set_state(&self, state: &'static str, lease: Option<i64>, error: Option<String>) {
        let mut status = self.status.borrow_mut();
        status.state = state;
        status.lease = lease;
        if error.is_some() || state == "registered" {
            status.last_error = error;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
