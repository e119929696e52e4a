//! HTTP callbacks to the message server (COMPAT.md section 4): `checkToken` before an
//! upgrade, `online`/`offline` after (queued by `presence`), and the monitor's node
//! events.
//!
//! Every call here blocks (ureq), so nothing in this module may run on a shard thread:
//! `checkToken` runs on a shard's blocking pool, presence events on `presence`'s own
//! worker threads.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::token::ClientToken;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a callback did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallbackError {
    /// The message server could not be reached or did not answer in time.
    #[error("message server unreachable: {0}")]
    Unreachable(String),
    /// It answered with an HTTP status other than 200 (and the start of its body,
    /// escaped).
    #[error("message server answered HTTP {0}, body {1}")]
    Status(u16, String),
    /// It answered 200 with a body that is not the `{code, data, error}` object, or one
    /// larger than [`MAX_ANSWER_BYTES`].
    #[error("message server answered an unreadable body: {0}")]
    BadBody(String),
    /// It answered with a non-zero code: a verdict, not a failure.
    #[error("refused by message server: {0}")]
    Refused(String),
}

impl CallbackError {
    /// Whether trying again later may succeed (the server was down or broken, not refusing).
    pub(crate) fn is_transient(&self) -> bool {
        !matches!(self, CallbackError::Refused(_))
    }
}

/// Largest answer body read from the message server. The answer is a small
/// `{code, data, error}` object; an unbounded read let one 400 MB answer cost +400 MB
/// of resident memory per call in flight.
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How much of a body a log line quotes.
const LOGGED_BODY_BYTES: usize = 200;

/// The first bytes of `bytes` as an escaped, quoted string (for logs: a body may hold
/// anything, newlines and escape sequences included).
pub(crate) fn escaped_prefix(bytes: &[u8]) -> String {
    let cut = bytes.len().min(LOGGED_BODY_BYTES);
    let text = String::from_utf8_lossy(&bytes[..cut]);
    if cut < bytes.len() {
        format!("{text:?} (first {cut} of {} bytes)", bytes.len())
    } else {
        format!("{text:?}")
    }
}

/// A callback URL as logs may show it: no userinfo (credentials), no query (keys), no
/// fragment.
pub(crate) fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(at) => rest.split_at(at),
        None => (rest, ""),
    };
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

/// Upper bounds (milliseconds) of the callback latency histogram's buckets; a last,
/// unbounded bucket follows.
pub(crate) const LATENCY_BUCKETS_MS: [u64; 12] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// The methods whose latency is kept apart (`comet_callback_latency_seconds`);
/// every other method (the monitor's node events) counts as `other`.
pub(crate) const LATENCY_METHODS: [&str; 4] = ["checkToken", "online", "offline", "other"];

/// One method's latency histogram (lock-free).
#[derive(Debug, Default)]
struct MethodLatency {
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    sum_us: AtomicU64,
}

/// Callback counters shared by every thread that makes callbacks (lock-free).
#[derive(Debug, Default)]
pub(crate) struct CallbackStats {
    calls: AtomicU64,
    failures: AtomicU64,
    refusals: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_us: AtomicU64,
    by_method: [MethodLatency; LATENCY_METHODS.len()],
}

/// The histogram bucket of a latency.
fn bucket_of(elapsed: Duration) -> usize {
    let ms = elapsed.as_millis() as u64;
    LATENCY_BUCKETS_MS
        .iter()
        .position(|&bound| ms < bound)
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

impl CallbackStats {
    fn record_method(&self, method: &str, elapsed: Duration) {
        let index = LATENCY_METHODS
            .iter()
            .position(|&known| known == method)
            .unwrap_or(LATENCY_METHODS.len() - 1);
        let latency = &self.by_method[index];
        latency.buckets[bucket_of(elapsed)].fetch_add(1, Ordering::Relaxed);
        latency
            .sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

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
        self.latency[bucket_of(elapsed)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The figures now.
    pub(crate) fn figures(&self) -> CallbackFigures {
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
            by_method: LATENCY_METHODS
                .iter()
                .zip(&self.by_method)
                .map(|(method, latency)| MethodFigures {
                    method,
                    latency_sum_us: latency.sum_us.load(Ordering::Relaxed),
                    latency_counts: latency
                        .buckets
                        .iter()
                        .map(|b| b.load(Ordering::Relaxed))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// One method's latency figures: per-bucket counts (not cumulative, over
/// [`LATENCY_BUCKETS_MS`] and a last unbounded bucket) and their sum.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct MethodFigures {
    /// One of [`LATENCY_METHODS`].
    pub(crate) method: &'static str,
    /// Sum of latencies, microseconds.
    pub(crate) latency_sum_us: u64,
    /// Per-bucket counts, one more than the bounds.
    pub(crate) latency_counts: Vec<u64>,
}

/// A snapshot of [`CallbackStats`]. `latency_counts[i]` counts calls that took less than
/// `latency_le_ms[i]` (and at least the bound before); the last entry counts the rest.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct CallbackFigures {
    /// Callbacks made.
    pub(crate) calls: u64,
    /// Callbacks that failed (unreachable, HTTP error, bad body).
    pub(crate) failures: u64,
    /// Callbacks answered with a non-zero code.
    pub(crate) refusals: u64,
    /// Sum of latencies, microseconds.
    pub(crate) latency_sum_us: u64,
    /// Bucket upper bounds, milliseconds.
    pub(crate) latency_le_ms: [u64; LATENCY_BUCKETS_MS.len()],
    /// Per-bucket counts (not cumulative), one more than the bounds.
    pub(crate) latency_counts: Vec<u64>,
    /// The same latency, by method.
    pub(crate) by_method: Vec<MethodFigures>,
}

/// A blocking client for the message server's callback URL. Cheap to clone (shared agent).
#[derive(Clone)]
pub(crate) struct CallbackClient {
    agent: ureq::Agent,
    url: Arc<str>,
    /// `url` without credentials or query, for logs.
    log_url: Arc<str>,
    user_agent: Arc<str>,
    rpc_addr: Arc<str>,
    stats: Arc<CallbackStats>,
}

impl CallbackClient {
    /// `rpc_addr` is the node identity sent as the last argument of client callbacks;
    /// every call is counted in `stats`.
    pub(crate) fn new(
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
            // A redirect is not followed: ureq would turn the POST into a bodiless GET to
            // the `Location`, and whatever answered `{"code":0}` there would admit every
            // token. A 3xx is a failed call, like a 5xx.
            .redirects(0)
            .build();
        CallbackClient {
            agent,
            url: url.into(),
            log_url: redacted_url(url).into(),
            user_agent: user_agent.into(),
            rpc_addr: rpc_addr.into(),
            stats,
        }
    }

    /// The callback URL as logs may show it (see [`redacted_url`]).
    pub(crate) fn log_url(&self) -> &str {
        &self.log_url
    }

    /// Asks whether a client may connect.
    pub(crate) fn check_token(&self, token: &ClientToken) -> Result<(), CallbackError> {
        let args = [&token.conn_id, &token.token, &token.info, &*self.rpc_addr];
        self.call("checkToken", &args.map(|a| json!(a)))
    }

    /// The node identity sent as the last argument of client callbacks.
    pub(crate) fn rpc_addr(&self) -> &str {
        &self.rpc_addr
    }

    /// Like [`CallbackClient::call`], retrying transient failures `retries` times with
    /// exponential backoff (blocking the calling thread meanwhile). `id` names what the
    /// call is about (a conn_id, a node key) in the logs.
    pub(crate) fn call_with_retries(
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
                        tracing::info!(id, method, attempt, url = %self.log_url, "callback delivered after retry");
                    }
                    return Ok(());
                }
                Err(err) if err.is_transient() && attempt < retries => {
                    tracing::warn!(id, method, attempt, url = %self.log_url, error = %err, retry_in = ?backoff, "callback failed; will retry");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(err) => {
                    tracing::error!(id, method, attempts = attempt + 1, url = %self.log_url, error = %err, "callback given up");
                    return Err(err);
                }
            }
        }
    }

    /// Posts `{"class":"Im","method":..,"args":[..]}` and checks for `{"code":0}`.
    pub(crate) fn call(
        &self,
        method: &str,
        args: &[serde_json::Value],
    ) -> Result<(), CallbackError> {
        let started = Instant::now();
        let outcome = self.post(method, args);
        let elapsed = started.elapsed();
        self.stats.record(elapsed, &outcome);
        self.stats.record_method(method, elapsed);
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
            Err(ureq::Error::Status(code, response)) => return Err(status_error(code, response)),
            // Not `err.to_string()`: ureq's text starts with the URL, credentials and
            // query included.
            Err(ureq::Error::Transport(err)) => {
                let mut why = err.kind().to_string();
                if let Some(message) = err.message() {
                    why = format!("{why}: {message}");
                }
                if let Some(source) = std::error::Error::source(&err) {
                    why = format!("{why}: {source}");
                }
                return Err(CallbackError::Unreachable(why));
            }
        };
        if response.status() >= 300 {
            return Err(status_error(response.status(), response));
        }
        let body = read_bounded(response.into_reader(), MAX_ANSWER_BYTES)?;
        let reply: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| CallbackError::BadBody(format!("{e} in {}", escaped_prefix(&body))))?;
        match reply.get("code").and_then(serde_json::Value::as_i64) {
            Some(0) => Ok(()),
            Some(code) => {
                let why = reply.get("error").and_then(|e| e.as_str()).unwrap_or("");
                Err(CallbackError::Refused(format!(
                    "code {code}: {}",
                    escaped_prefix(why.as_bytes())
                )))
            }
            None => Err(CallbackError::BadBody(format!(
                "no numeric `code` in {}",
                escaped_prefix(&body)
            ))),
        }
    }
}

/// Reads a body of at most `limit` bytes; a larger one is a failed call, and no more of
/// it than `limit + 1` bytes is ever held.
fn read_bounded(reader: impl Read, limit: usize) -> Result<Vec<u8>, CallbackError> {
    let mut body = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| CallbackError::Unreachable(format!("reading the answer: {e}")))?;
    if body.len() > limit {
        return Err(CallbackError::BadBody(format!(
            "answer larger than {limit} bytes"
        )));
    }
    Ok(body)
}

/// A call answered with a status other than 2xx, with the start of its body for the log.
fn status_error(code: u16, response: ureq::Response) -> CallbackError {
    let mut prefix = Vec::new();
    let _ = response
        .into_reader()
        .take(LOGGED_BODY_BYTES as u64 + 1)
        .read_to_end(&mut prefix);
    CallbackError::Status(code, escaped_prefix(&prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_is_kept_per_method_and_unknown_methods_count_as_other() {
        let stats = CallbackStats::default();
        stats.record_method("online", Duration::from_millis(3));
        stats.record_method("online", Duration::from_micros(500));
        stats.record_method("addCometServer", Duration::from_secs(9));
        let figures = stats.figures();
        let online = &figures.by_method[1];
        assert_eq!((online.method, online.latency_sum_us), ("online", 3_500));
        assert_eq!(online.latency_counts[..3], [1, 0, 1]);
        let other = &figures.by_method[3];
        assert_eq!(other.method, "other");
        assert_eq!(other.latency_counts.last(), Some(&1));
        assert_eq!(figures.by_method[0].latency_counts.iter().sum::<u64>(), 0);
    }

    #[test]
    fn logged_urls_lose_credentials_query_and_fragment() {
        assert_eq!(
            redacted_url("https://user:p%40ss@msg.example.com:8443/im/rpc?key=s3cret#x"),
            "https://msg.example.com:8443/im/rpc"
        );
        assert_eq!(
            redacted_url("http://127.0.0.1:9/im"),
            "http://127.0.0.1:9/im"
        );
        assert_eq!(redacted_url("http://a@b?k=v"), "http://b");
    }

    #[test]
    fn logged_bodies_are_escaped_and_short() {
        assert_eq!(
            escaped_prefix(b"line\nESC\x1b[31m"),
            r#""line\nESC\u{1b}[31m""#
        );
        let long = escaped_prefix(&[b'a'; 1000]);
        assert!(long.ends_with("(first 200 of 1000 bytes)"), "{long}");
        assert!(long.len() < 240, "{long}");
    }

    #[test]
    fn an_answer_over_the_cap_is_a_failed_call_and_is_not_read_whole() {
        let small = read_bounded(&b"{\"code\":0}"[..], 64).unwrap();
        assert_eq!(small, b"{\"code\":0}");
        let mut endless = std::io::repeat(b' ');
        let err = read_bounded(&mut endless, MAX_ANSWER_BYTES).unwrap_err();
        assert!(matches!(err, CallbackError::BadBody(_)), "{err}");
        assert!(err.is_transient());
    }

    /// Answers every connection on a loopback listener with `answer`; returns its port.
    fn answering(answer: String) -> u16 {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        port
    }

    #[test]
    fn a_redirect_is_a_failed_call_not_followed() {
        let body = "{\"code\":0}";
        let accepting = answering(format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ));
        let redirecting = answering(format!(
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{accepting}/\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ));
        let client = |port: u16| {
            CallbackClient::new(
                &format!("http://127.0.0.1:{port}/"),
                "test",
                "127.0.0.1:1",
                Duration::from_secs(2),
                Arc::default(),
            )
        };
        let token = ClientToken {
            conn_id: "c".into(),
            token: "t".into(),
            info: String::new(),
            recovery: Default::default(),
        };
        assert!(client(accepting).check_token(&token).is_ok());
        let err = client(redirecting).check_token(&token).unwrap_err();
        assert!(matches!(err, CallbackError::Status(302, _)), "{err}");
    }
}
