//! HTTP callbacks to the message server (COMPAT.md section 4): `checkToken` before an
//! upgrade, `online`/`offline` after (queued by `presence`), and the monitor's node
//! events.
//!
//! Every call here blocks (ureq), so nothing in this module may run on a shard thread:
//! `checkToken` runs on a shard's blocking pool, presence events on `presence`'s own
//! worker threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::transport::ws::handshake::ClientToken;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a callback did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// The message server could not be reached or did not answer in time.
    #[error("message server unreachable: {0}")]
    Unreachable(String),
    /// It answered with an HTTP status other than 200.
    #[error("message server answered HTTP {0}")]
    Status(u16),
    /// It answered 200 with a body that is not the `{code, data, error}` object.
    #[error("message server answered an unreadable body: {0}")]
    BadBody(String),
    /// It answered with a non-zero code: a verdict, not a failure.
    #[error("refused by message server: {0}")]
    Refused(String),
}

impl CallbackError {
    /// Whether trying again later may succeed (the server was down or broken, not refusing).
    pub fn is_transient(&self) -> bool {
        !matches!(self, CallbackError::Refused(_))
    }
}

/// Upper bounds (milliseconds) of the callback latency histogram's buckets; a last,
/// unbounded bucket follows.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// Callback counters shared by every thread that makes callbacks (lock-free).
#[derive(Debug, Default)]
pub struct CallbackStats {
    calls: AtomicU64,
    failures: AtomicU64,
    refusals: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_us: AtomicU64,
}

impl CallbackStats {
    fn record(&self, elapsed: Duration, outcome: &Result<(), CallbackError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(()) => {}
            Err(CallbackError::Refused(_)) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ms = elapsed.as_millis() as u64;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|&bound| ms < bound)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The figures now.
    pub fn figures(&self) -> CallbackFigures {
        CallbackFigures {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            refusals: self.refusals.load(Ordering::Relaxed),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
            latency_le_ms: LATENCY_BUCKETS_MS,
            latency_counts: self
                .latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// A snapshot of [`CallbackStats`]. `latency_counts[i]` counts calls that took less than
/// `latency_le_ms[i]` (and at least the bound before); the last entry counts the rest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallbackFigures {
    /// Callbacks made.
    pub calls: u64,
    /// Callbacks that failed (unreachable, HTTP error, bad body).
    pub failures: u64,
    /// Callbacks answered with a non-zero code.
    pub refusals: u64,
    /// Sum of latencies, microseconds.
    pub latency_sum_us: u64,
    /// Bucket upper bounds, milliseconds.
    pub latency_le_ms: [u64; LATENCY_BUCKETS_MS.len()],
    /// Per-bucket counts (not cumulative), one more than the bounds.
    pub latency_counts: Vec<u64>,
}

/// A blocking client for the message server's callback URL. Cheap to clone (shared agent).
#[derive(Clone)]
pub struct CallbackClient {
    agent: ureq::Agent,
    url: Arc<str>,
    user_agent: Arc<str>,
    rpc_addr: Arc<str>,
    stats: Arc<CallbackStats>,
}

impl CallbackClient {
    /// `rpc_addr` is the node identity sent as the last argument of client callbacks;
    /// every call is counted in `stats`.
    pub fn new(
        url: &str,
        user_agent: &str,
        rpc_addr: &str,
        timeout: Duration,
        stats: Arc<CallbackStats>,
    ) -> CallbackClient {
        let agent = ureq::AgentBuilder::new()
            .timeout(timeout)
            // Many handshakes and presence events go to one host at once: keep a pool.
            .max_idle_connections_per_host(64)
            .user_agent(user_agent)
            .build();
        CallbackClient {
            agent,
            url: url.into(),
            user_agent: user_agent.into(),
            rpc_addr: rpc_addr.into(),
            stats,
        }
    }

    /// Asks whether a client may connect.
    pub fn check_token(&self, token: &ClientToken) -> Result<(), CallbackError> {
        let args = [&token.conn_id, &token.token, &token.info, &*self.rpc_addr];
        self.call("checkToken", &args.map(|a| json!(a)))
    }

    /// The node identity sent as the last argument of client callbacks.
    pub fn rpc_addr(&self) -> &str {
        &self.rpc_addr
    }

    /// Like [`CallbackClient::call`], retrying transient failures `retries` times with
    /// exponential backoff (blocking the calling thread meanwhile). `id` names what the
    /// call is about (a conn_id, a node key) in the logs.
    pub fn call_with_retries(
        &self,
        method: &str,
        args: &[serde_json::Value],
        retries: u32,
        id: &str,
    ) -> Result<(), CallbackError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            match self.call(method, args) {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(id, method, attempt, "callback delivered after retry");
                    }
                    return Ok(());
                }
                Err(err) if err.is_transient() && attempt < retries => {
                    tracing::warn!(id, method, attempt, error = %err, retry_in = ?backoff, "callback failed; will retry");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(err) => {
                    tracing::error!(id, method, attempts = attempt + 1, error = %err, "callback given up");
                    return Err(err);
                }
            }
        }
    }

    /// Posts `{"class":"Im","method":..,"args":[..]}` and checks for `{"code":0}`.
    pub fn call(&self, method: &str, args: &[serde_json::Value]) -> Result<(), CallbackError> {
        let started = Instant::now();
        let outcome = self.post(method, args);
        self.stats.record(started.elapsed(), &outcome);
        outcome
    }

    fn post(&self, method: &str, args: &[serde_json::Value]) -> Result<(), CallbackError> {
        let body = json!({"class": "Im", "method": method, "args": args});
        let response = self
            .agent
            .post(&self.url)
            .set("User-Agent", &self.user_agent)
            .set("Accept", "application/json")
            .send_json(body);
        let response = match response {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => return Err(CallbackError::Status(code)),
            Err(err) => return Err(CallbackError::Unreachable(err.to_string())),
        };
        let reply: serde_json::Value = response
            .into_json()
            .map_err(|e| CallbackError::BadBody(e.to_string()))?;
        match reply.get("code").and_then(serde_json::Value::as_i64) {
            Some(0) => Ok(()),
            Some(code) => {
                let why = reply.get("error").and_then(|e| e.as_str()).unwrap_or("");
                Err(CallbackError::Refused(format!("code {code}: {why}")))
            }
            None => Err(CallbackError::BadBody(format!(
                "no numeric `code` in {reply}"
            ))),
        }
    }
}
