//! Configuration: the INI file of the original Comet (both generations of keys) plus
//! Comet's own tuning keys, parsed into one validated [`Config`].
//!
//! This module owns parsing and validation only. It never opens sockets or files other
//! than the INI file and the PEM files it must prove readable; a bad value is reported
//! as a [`ConfigError`] naming the key (and line), never silently replaced by a default.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration a node runs with when no `-c` is given and `./comet.ini` is absent:
/// standalone (no etcd), every token accepted (no message server), local ports.
pub const EMBEDDED_DEFAULT: &str = "\
comet_service_name=comet
etcd_addr=
rpc_api_url=
socket_protocol=ws
websocket_host=127.0.0.1
websocket_port=:8900
rpc_addr=127.0.0.1:8901
";

/// The default of `rpc_max_request_size`: the largest single push RPC request.
pub const DEFAULT_RPC_MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// Default of `handshake_per_source_limit`: connections from one source still in their
/// handshake, per shard. A bench worker keeps 32 handshakes in flight from its source
/// over all shards; the handshakes of one shard that wait for a `checkToken` verdict
/// are at most `callback_queue_size` (64), so a NAT'ed office can fill its shard's whole
/// `checkToken` queue and have as many again still sending their request. An attacker's
/// half-open upgrades never get a token accepted and each holds its place for
/// `handshake_timeout`: past 128 per shard (256 on two shards) they are closed unread.
pub const DEFAULT_HANDSHAKES_PER_SOURCE: usize = 128;

/// Why a configuration was refused. Every variant names the offending key or line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config line {line}: expected `key=value`, found {text:?}")]
    Syntax { line: usize, text: String },
    #[error("config key `{key}`: {reason} (value {value:?})")]
    BadValue {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("config key `{key}` is required: {reason}")]
    Missing {
        key: &'static str,
        reason: &'static str,
    },
    /// A [`ConfigError::BadValue`] with the line of the file its key came from.
    #[error("config line {line}: {source}")]
    AtLine {
        line: usize,
        source: Box<ConfigError>,
    },
}

/// Which upgrade requests this node accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradePolicy {
    /// The one path clients upgrade on (`/ws` in COMPAT.md).
    pub path: String,
    /// The path of the Server-Sent Events stream (`/sse`).
    pub sse_path: String,
    /// Origins a browser may connect from (`https://app.example.com`, or
    /// `https://*.example.com` for any subdomain); empty: any. Requests without an
    /// `Origin` header (native clients; browsers always send one) are not checked.
    pub allowed_origins: Vec<String>,
}

impl Default for UpgradePolicy {
    fn default() -> UpgradePolicy {
        UpgradePolicy {
            path: "/ws".into(),
            sse_path: "/sse".into(),
            allowed_origins: Vec::new(),
        }
    }
}

/// How log lines are written (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-03T06:10:13Z  INFO comet::app: message key=value`, for people.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`), for log
    /// shippers that would otherwise have to parse the text form.
    Json,
}

/// How clients reach this node (`socket_protocol`, or the older `websocket_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketProtocol {
    /// Plain WebSocket (`websocket` or `ws`).
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// Raw TCP.
    Tcp,
}

impl SocketProtocol {
    /// The scheme written into the advertised comet address.
    pub fn scheme(self) -> &'static str {
        match self {
            SocketProtocol::Ws => "ws",
            SocketProtocol::Wss => "wss",
            SocketProtocol::Tcp => "tcp",
        }
    }
}

/// What happens when a client connects with a conn_id that is already connected here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicatePolicy {
    /// Refuse the newcomer with HTTP 400 (the original's behaviour).
    Reject,
    /// Close the old connection (it gets its `offline`) and accept the newcomer.
    Replace,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Number of shards (one pinned executor per core).
    pub max_proc: usize,
    /// etcd key prefix name.
    pub comet_service_name: String,
    /// etcd endpoints; empty means standalone.
    pub etcd_endpoints: Vec<String>,
    /// Message server callback URL; empty means no message server (every token accepted).
    pub rpc_api_url: String,
    /// User-Agent of callbacks.
    pub rpc_user_agent: String,
    /// Client transport.
    pub socket_protocol: SocketProtocol,
    /// Public host name clients use.
    pub websocket_host: String,
    /// Client listen port.
    pub websocket_port: u16,
    /// Certificate chain (PEM) for wss and TLS on the TCP listener.
    pub wss_cert_pem: Option<PathBuf>,
    /// Private key (PEM) for wss and TLS on the TCP listener.
    pub wss_key_pem: Option<PathBuf>,
    /// Upgrade path and allowed origins of WebSocket clients.
    pub websocket_policy: UpgradePolicy,
    /// A raw TCP listener besides the WebSocket one (`socket_protocol=tcp` makes the
    /// client port itself raw TCP instead).
    pub tcp_port: Option<u16>,
    /// A WebSocket-over-TLS listener besides the client port (serve ws and wss at once).
    pub wss_port: Option<u16>,
    /// The message protocol of raw TCP clients.
    pub tcp_protocol: TcpProtocol,
    /// TLS on raw TCP clients.
    pub tcp_tls: bool,
    /// Push RPC listen address and the node's identity.
    pub rpc_addr: String,
    /// Parsed form of `rpc_addr`, to listen on.
    pub rpc_listen: SocketAddr,
    /// Shared secret of the push RPC; empty means none required.
    pub comet_rpc_token: String,
    /// Push RPC connections served at once; more are closed right after accept.
    pub rpc_max_connections: usize,
    /// Largest push RPC request (bytes) on a connection that has authenticated.
    pub rpc_max_request_size: usize,
    /// Unfinished request (bytes) a connection may hold before its first call with the
    /// right `comet_rpc_token` (any well-formed call when none is set); beyond it, bytes
    /// come from `rpc_preauth_pool_size`.
    pub rpc_preauth_request_size: usize,
    /// Bytes all not-yet-authenticated connections together may hold beyond their own
    /// `rpc_preauth_request_size` (zero: none).
    pub rpc_preauth_pool_size: usize,
    /// A push RPC connection must make that first call within this of its first byte (one
    /// that has sent nothing is kept: the original's message servers dial ahead).
    pub rpc_first_call_timeout: Duration,
    /// An authenticated push RPC connection silent for this long is closed (zero: never).
    // Off by default: the original never closed an idle message-server connection, and
    // Go `net/rpc` clients keep one open for their whole life (a close is ErrShutdown on
    // their next call). Connections that never authenticate are bounded by
    // `rpc_first_call_timeout` whatever this says.
    pub rpc_idle_timeout: Duration,
    /// Interval between server pings.
    pub ping_interval: Duration,
    /// A client silent for longer than this is dropped.
    pub heartbeat_timeout: Duration,
    /// A client that has not completed its upgrade within this is dropped.
    pub handshake_timeout: Duration,
    /// Connections from one source (an IPv4 address, an IPv6 /64) still in their
    /// handshake, per shard; one more is closed at once. 0 = no limit.
    pub handshake_per_source_limit: usize,
    /// Descriptors kept free for push RPC, admin and callbacks: a shard stops accepting
    /// clients when the process comes within this many of its open-files limit. 0 = none.
    pub fd_reserve: usize,
    /// Largest message a client may send (bytes).
    pub max_frame_size: usize,
    /// A RESP connection that is authenticated but not subscribed (a pooled connection,
    /// or one that left its last channel) is closed after this long without a command.
    pub resp_idle_timeout: Duration,
    /// Outbound messages a session may have queued before it is a slow consumer.
    pub outbound_queue_size: usize,
    /// Bytes a session may have queued (pushes and its own replies together) before it
    /// stops being read from; a push past it makes the client a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Join messages queued together into one `\n`-separated frame (the original's framing).
    pub coalesce_messages: bool,
    /// permessage-deflate for WebSocket clients that offer it (`websocket_compression`,
    /// `_min_size`, `_level`); `None`: off, offers are not answered.
    pub websocket_compression: Option<crate::codec::deflate::Deflate>,
    /// The `retry:` an event stream starts with: how long EventSource waits to reconnect.
    pub sse_retry: Duration,
    /// What a duplicate conn_id does.
    pub duplicate_conn_id: DuplicatePolicy,
    /// Pushes kept per conn_id for clients that opt in to recovery; 0: off.
    pub recovery_window: usize,
    /// How long a gone recovering client's buffer is kept (and takes pushes).
    pub recovery_ttl: Duration,
    /// Bytes kept per conn_id (payloads plus a fixed overhead per message).
    pub recovery_bytes: usize,
    /// Bytes kept on the node, split evenly between the shards (they share nothing).
    pub recovery_total_bytes: usize,
    /// Timeout of one callback HTTP request.
    pub callback_timeout: Duration,
    /// How many times an `online`/`offline` is retried before it is given up (logged).
    pub callback_retries: u32,
    /// Threads per shard that run `checkToken` calls.
    pub callback_threads: usize,
    /// Presence lanes: `online`/`offline` callbacks delivered concurrently (each conn_id
    /// always on the same lane, so its own events stay in order).
    pub presence_workers: usize,
    /// Bytes of `online`/`offline` events waiting for the message server; past it new
    /// sessions are refused (503) until it catches up.
    pub presence_queue_bytes: usize,
    /// `checkToken` calls queued or running per shard; a handshake beyond them gets 503.
    pub callback_queue_size: usize,
    /// Entries of each of a shard's io_uring rings. The kernel sizes a ring's table of
    /// pending polls from this (up to 256 buckets at 4096), and glommio cancels a request
    /// in that table every time a shard goes idle: with the default of 128 (8 buckets),
    /// 10,000 idle clients made each cancel walk ~1,200 entries.
    pub io_uring_depth: usize,
    /// Grace for a closing client to answer our close frame.
    pub close_timeout: Duration,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive).
    pub log_level: String,
    /// How each log line is written: human-readable text, or one JSON object per line.
    pub log_format: LogFormat,
    /// Bytes of log lines that may wait for a slow log reader before lines are dropped.
    pub log_queue_bytes: usize,
    /// Interval of the INFO summary line (per-client events are debug lines).
    pub log_summary_interval: Duration,
    /// TTL of the node's etcd lease.
    pub etcd_lease_ttl: Duration,
    /// Interval between lease keepalives.
    pub etcd_keepalive_interval: Duration,
    /// Load thresholds that make the node advertise itself overloaded / refuse new clients.
    pub overload: OverloadThresholds,
    /// How often the load self-check samples.
    pub load_check_interval: Duration,
    /// Shutdown closes clients spread over this window (zero: all at once).
    pub drain_window: Duration,
    /// Secrets for signed (HS256 JWT) client tokens, current first; empty: tokens are
    /// checked by the `checkToken` callback.
    pub token_secrets: Vec<Vec<u8>>,
    /// Clock skew tolerated on signed tokens' time claims.
    pub token_leeway: Duration,
    /// PEM or JWKS file of the public keys of RS256/ES256/EdDSA tokens; empty: none.
    pub token_public_keys: String,
    /// `aud` every signed token must carry; empty: not checked.
    pub token_audience: String,
    /// `iss` every signed token must carry; empty: not checked.
    pub token_issuer: String,
    /// Longest signed-token lifetime accepted (`exp - iat`); zero: no limit.
    pub token_max_age: Duration,
    /// Admin HTTP listener (`/healthz`, `/readyz`, `/status`, `/metrics`); `None`: off.
    pub admin_addr: Option<SocketAddr>,
    /// Token `/status` and `/metrics` require; empty: none (only allowed on loopback).
    pub admin_token: String,
}

/// The message protocol raw TCP clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpProtocol {
    /// Chosen per connection by its first byte: `{` JSON-lines, anything else RESP.
    Auto,
    /// One JSON object per line.
    Json,
    /// Redis RESP2/RESP3.
    Resp,
}

/// Load self-check thresholds. `None` disables a threshold. A soft threshold sets
/// `overloaded: true` in the node's etcd value; a hard one makes new handshakes get 503.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverloadThresholds {
    /// Connected clients.
    pub soft_connections: Option<u64>,
    /// Connected clients.
    pub hard_connections: Option<u64>,
    /// Resident memory, bytes.
    pub soft_rss: Option<u64>,
    /// Resident memory, bytes.
    pub hard_rss: Option<u64>,
    /// Messages waiting in outbound queues.
    pub soft_queued: Option<u64>,
    /// Messages waiting in outbound queues.
    pub hard_queued: Option<u64>,
}

impl Config {
    /// Reads and validates an INI file.
    pub fn load(path: &Path) -> Result<(Config, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses INI text. Returns the config and the warnings (unknown keys) to log.
    pub fn parse(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        let mut raw = RawIni::parse(text)?;
        let config = Config::from_raw(&mut raw).map_err(|err| raw.locate(err))?;
        let mut warnings: Vec<String> = raw
            .unused()
            .map(|(key, line)| match raw.nearest_known(key) {
                Some(known) => format!(
                    "config line {line}: unknown key `{key}` ignored (did you mean `{known}`?)"
                ),
                None => format!("config line {line}: unknown key `{key}` ignored"),
            })
            .collect();
        // Not refused: the original ran like this, and configurations of it must start.
        if config.rpc_open_to_anyone() {
            warnings.push(format!(
                "INSECURE: the push RPC listens on {} (reachable from other hosts) and \
                 comet_rpc_token is empty: anyone who can reach it can list, push to and \
                 kick every client. Set comet_rpc_token, or listen on a loopback address",
                config.rpc_listen
            ));
        }
        if config.recovery_window > config.outbound_queue_size {
            warnings.push(format!(
                "recovery_window={} is larger than outbound_queue_size={}: a client that \
                 reconnects with a full buffer to replay is closed as a slow consumer",
                config.recovery_window, config.outbound_queue_size
            ));
        }
        Ok((config, warnings))
    }

    /// Whether the push RPC is reachable from other hosts with no token required.
    pub fn rpc_open_to_anyone(&self) -> bool {
        !self.rpc_listen.ip().is_loopback() && self.comet_rpc_token.is_empty()
    }

    /// Whether any client listener is TLS.
    pub fn needs_tls(&self) -> bool {
        self.socket_protocol == SocketProtocol::Wss || self.tcp_tls || self.wss_port.is_some()
    }

    /// The address clients are told to use, e.g. `ws://comet.demo.com:8900`.
    pub fn comet_addr(&self) -> String {
        format!(
            "{}://{}:{}",
            self.socket_protocol.scheme(),
            self.websocket_host,
            self.websocket_port
        )
    }

    fn from_raw(raw: &mut RawIni) -> Result<Config, ConfigError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_proc = match raw.take_set("max_proc") {
            None => cores,
            Some(v) => parse_count("max_proc", &v, 1, 1024)?,
        };
        let socket_protocol = parse_socket_protocol(raw)?;
        let tcp_tls = raw.boolean("tcp_tls", false)?;
        let wants_tls = socket_protocol == SocketProtocol::Wss || tcp_tls || raw.has("wss_port");
        let (wss_cert_pem, wss_key_pem) = parse_tls_files(raw, wants_tls)?;
        let (rpc_addr, rpc_listen) = parse_rpc_addr(raw)?;
        let websocket_port = match raw.take_set("websocket_port") {
            None => 8900,
            Some(v) => parse_port("websocket_port", &v)?,
        };
        let tcp_port = raw.optional_port("tcp_port")?;
        let wss_port = raw.optional_port("wss_port")?;
        check_distinct_ports(websocket_port, tcp_port, wss_port)?;
        let ping_interval = raw.duration("ping_interval", Duration::from_secs(9))?;
        let heartbeat_timeout = raw.duration("heartbeat_timeout", Duration::from_secs(10))?;
        if heartbeat_timeout <= ping_interval {
            return Err(ConfigError::BadValue {
                key: "heartbeat_timeout",
                value: format!("{heartbeat_timeout:?}"),
                reason: format!("must be longer than ping_interval ({ping_interval:?})"),
            });
        }
        Ok(Config {
            max_proc,
            comet_service_name: raw.string("comet_service_name", "comet"),
            etcd_endpoints: parse_endpoints(&raw.string("etcd_addr", "")),
            rpc_api_url: parse_url(raw)?,
            rpc_user_agent: raw.string("rpc_user_agent", "Comet/1.0"),
            socket_protocol,
            websocket_host: raw.string("websocket_host", "127.0.0.1"),
            websocket_port,
            wss_cert_pem,
            wss_key_pem,
            websocket_policy: parse_upgrade_policy(raw)?,
            tcp_port,
            wss_port,
            tcp_protocol: parse_tcp_protocol(raw)?,
            tcp_tls,
            rpc_addr,
            rpc_listen,
            comet_rpc_token: raw.string("comet_rpc_token", ""),
            rpc_max_connections: raw.count("rpc_max_connections", 4096, 1, 1 << 16)?,
            rpc_max_request_size: raw.count(
                "rpc_max_request_size",
                DEFAULT_RPC_MAX_REQUEST_BYTES,
                1024,
                256 << 20,
            )?,
            rpc_preauth_request_size: raw.count(
                "rpc_preauth_request_size",
                64 << 10,
                256,
                16 << 20,
            )?,
            rpc_preauth_pool_size: raw.count("rpc_preauth_pool_size", 64 << 20, 0, 1 << 30)?,
            rpc_first_call_timeout: raw
                .duration("rpc_first_call_timeout", Duration::from_secs(10))?,
            rpc_idle_timeout: raw.duration_or_zero("rpc_idle_timeout", Duration::ZERO)?,
            ping_interval,
            heartbeat_timeout,
            handshake_timeout: raw.duration("handshake_timeout", Duration::from_secs(5))?,
            handshake_per_source_limit: raw.count(
                "handshake_per_source_limit",
                DEFAULT_HANDSHAKES_PER_SOURCE,
                0,
                1 << 20,
            )?,
            fd_reserve: raw.count("fd_reserve", 64, 0, 1 << 20)?,
            max_frame_size: raw.count("max_frame_size", 512, 2, 16 << 20)?,
            resp_idle_timeout: raw.duration("resp_idle_timeout", Duration::from_secs(300))?,
            outbound_queue_size: raw.count("outbound_queue_size", 1024, 1, 1 << 20)?,
            outbound_queue_bytes: raw.count("outbound_queue_bytes", 1 << 20, 1024, 1 << 30)?,
            coalesce_messages: raw.boolean("coalesce_messages", false)?,
            websocket_compression: parse_compression(raw)?,
            sse_retry: raw.duration("sse_retry", Duration::from_secs(2))?,
            duplicate_conn_id: parse_duplicate_policy(raw)?,
            recovery_window: raw.count("recovery_window", 0, 0, 1 << 20)?,
            recovery_ttl: raw.duration("recovery_ttl", Duration::from_secs(60))?,
            recovery_bytes: raw.count("recovery_bytes", 64 << 10, 1024, 1 << 30)?,
            recovery_total_bytes: raw.count("recovery_total_bytes", 256 << 20, 1 << 20, 1 << 40)?,
            callback_timeout: raw.duration("callback_timeout", Duration::from_secs(5))?,
            callback_retries: raw.count("callback_retries", 5, 0, 100)? as u32,
            callback_threads: raw.count("callback_threads", 8, 1, 256)?,
            presence_workers: raw.count("presence_workers", 16, 1, 1024)?,
            presence_queue_bytes: raw.count("presence_queue_bytes", 64 << 20, 64 << 10, 1 << 40)?,
            callback_queue_size: raw.count("callback_queue_size", 64, 1, 1 << 20)?,
            io_uring_depth: raw.count("io_uring_depth", 4096, 16, 32768)?,
            close_timeout: raw.duration("close_timeout", Duration::from_secs(1))?,
            log_level: raw.string("log_level", "info"),
            log_format: parse_log_format(raw)?,
            log_queue_bytes: raw.count("log_queue_bytes", 4 << 20, 64 << 10, 1 << 30)?,
            log_summary_interval: raw.duration("log_summary_interval", Duration::from_secs(60))?,
            etcd_lease_ttl: parse_lease_ttl(raw)?,
            etcd_keepalive_interval: raw
                .duration("etcd_keepalive_interval", Duration::from_secs(1))?,
            overload: parse_overload(raw)?,
            load_check_interval: raw.duration("load_check_interval", Duration::from_secs(1))?,
            drain_window: raw.duration_or_zero("drain_window", Duration::from_secs(5))?,
            token_secrets: parse_token_secrets(raw)?,
            token_leeway: raw.duration_or_zero("token_leeway", Duration::from_secs(30))?,
            token_public_keys: raw.string("token_public_keys", ""),
            token_audience: raw.string("token_audience", ""),
            token_issuer: raw.string("token_issuer", ""),
            token_max_age: raw.duration_or_zero("token_max_age", Duration::ZERO)?,
            admin_addr: parse_admin_addr(raw)?,
            admin_token: raw.string("admin_token", ""),
        })
        .and_then(Config::check_admin_exposure)
    }

    /// An admin listener reachable from other hosts must be protected.
    fn check_admin_exposure(self) -> Result<Config, ConfigError> {
        match self.admin_addr {
            Some(addr) if !addr.ip().is_loopback() && self.admin_token.is_empty() => {
                Err(ConfigError::Missing {
                    key: "admin_token",
                    reason: "an admin_addr reachable from other hosts needs a token",
                })
            }
            _ => Ok(self),
        }
    }
}

/// The `key=value` pairs of an INI file, with the line each came from; keys are taken
/// out as they are understood so that the leftovers can be reported as unknown.
struct RawIni {
    values: HashMap<String, (String, usize)>,
    /// The line of every key in the file, kept after the key is taken, so that an error
    /// found later names the line.
    lines: HashMap<String, usize>,
    /// Every key the parser asked for, present or not: the known keys, for suggestions.
    asked: Vec<String>,
}

impl RawIni {
    fn parse(text: &str) -> Result<RawIni, ConfigError> {
        let mut values = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            // The original's files have no sections; tolerate a `[default]`-style header.
            if trimmed.starts_with('[') && trimmed.ends_with(']') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(ConfigError::Syntax {
                    line: index + 1,
                    text: trimmed.to_owned(),
                });
            };
            let key = key.trim();
            if key.is_empty() {
                return Err(ConfigError::Syntax {
                    line: index + 1,
                    text: trimmed.to_owned(),
                });
            }
            values.insert(
                key.to_ascii_lowercase(),
                (unquote(without_comment(value.trim())), index + 1),
            );
        }
        let lines = values.iter().map(|(k, (_, l))| (k.clone(), *l)).collect();
        Ok(RawIni {
            values,
            lines,
            asked: Vec::new(),
        })
    }

    fn take(&mut self, key: &str) -> Option<String> {
        self.asked.push(key.to_owned());
        self.values.remove(key).map(|(value, _)| value)
    }

    /// Like [`RawIni::take`], with an empty value taken as absent: `max_proc=` or
    /// `websocket_port=` is the default, as the original's go-ini (`MustInt`) read it.
    /// Strings keep their empty value (`comet_rpc_token=` is no token).
    fn take_set(&mut self, key: &str) -> Option<String> {
        self.take(key).filter(|value| !value.is_empty())
    }

    fn has(&self, key: &str) -> bool {
        self.values.get(key).is_some_and(|(v, _)| !v.is_empty())
    }

    /// Adds the line of the offending key to an error about its value.
    fn locate(&self, err: ConfigError) -> ConfigError {
        match &err {
            ConfigError::BadValue { key, .. } => match self.lines.get(*key) {
                Some(&line) => ConfigError::AtLine {
                    line,
                    source: Box::new(err),
                },
                None => err,
            },
            _ => err,
        }
    }

    /// The known key an unknown one is most likely a typo of: at most two edits away,
    /// and fewer than a third of its length (so `tls` suggests nothing).
    fn nearest_known(&self, unknown: &str) -> Option<&str> {
        let limit = (unknown.len() / 3).clamp(1, 2);
        self.asked
            .iter()
            .map(|known| (edit_distance(unknown, known), known.as_str()))
            .filter(|(distance, _)| *distance <= limit)
            .min_by_key(|(distance, _)| *distance)
            .map(|(_, known)| known)
    }

    fn optional_port(&mut self, key: &'static str) -> Result<Option<u16>, ConfigError> {
        match self.take_set(key) {
            None => Ok(None),
            Some(v) => parse_port(key, &v).map(Some),
        }
    }

    fn string(&mut self, key: &str, default: &str) -> String {
        self.take(key).unwrap_or_else(|| default.to_owned())
    }

    fn count(
        &mut self,
        key: &'static str,
        default: usize,
        min: usize,
        max: usize,
    ) -> Result<usize, ConfigError> {
        match self.take_set(key) {
            None => Ok(default),
            Some(value) => parse_count(key, &value, min, max),
        }
    }

    fn duration(&mut self, key: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        match self.take_set(key) {
            None => Ok(default),
            Some(value) => parse_duration(&value).map_err(|reason| ConfigError::BadValue {
                key,
                value,
                reason,
            }),
        }
    }

    /// Like [`RawIni::duration`], but `0` is allowed (the feature is off).
    fn duration_or_zero(
        &mut self,
        key: &'static str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match self.values.get(key).map(|(v, _)| v.trim()) {
            Some("0") => {
                self.take(key);
                Ok(Duration::ZERO)
            }
            _ => self.duration(key, default),
        }
    }

    fn boolean(&mut self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.take_set(key) {
            None => Ok(default),
            Some(value) => match value.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::BadValue {
                    key,
                    value,
                    reason: "expected true or false".into(),
                }),
            },
        }
    }

    fn unused(&self) -> impl Iterator<Item = (&str, usize)> {
        let mut keys: Vec<_> = self
            .values
            .iter()
            .map(|(k, (_, l))| (k.as_str(), *l))
            .collect();
        keys.sort_by_key(|(_, line)| *line);
        keys.into_iter()
    }
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Strips one pair of matching quotes: the original's files quote values with spaces.
/// A value without its inline comment: `#` or `;` after whitespace, and what follows
/// (`max_proc = 2 ; cores`), which go-ini cut from the original's files. go-ini cut at
/// a `#` or `;` inside a word too; that one stays (`http://host/rpc#x`, a token with a
/// `;`), as do both inside quotes.
fn without_comment(value: &str) -> &str {
    let searched = match value.as_bytes().first() {
        Some(&quote @ (b'"' | b'\'')) => match value[1..].find(quote as char) {
            Some(close) => close + 2,
            None => 0,
        },
        _ => 0,
    };
    let bytes = value.as_bytes();
    let cut = (searched.max(1)..bytes.len())
        .find(|&at| matches!(bytes[at], b'#' | b';') && bytes[at - 1].is_ascii_whitespace());
    match cut {
        Some(at) => value[..at].trim_end(),
        None => value,
    }
}

fn unquote(value: &str) -> String {
    let bytes = value.as_bytes();
    let quoted = bytes.len() >= 2
        && (bytes[0] == b'"' || bytes[0] == b'\'')
        && bytes[bytes.len() - 1] == bytes[0];
    if quoted {
        value[1..value.len() - 1].to_owned()
    } else {
        value.to_owned()
    }
}

fn parse_count(
    key: &'static str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    match value.parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::BadValue {
            key,
            value: value.to_owned(),
            reason: format!("expected a whole number from {min} to {max}"),
        }),
    }
}

/// Parses `10`, `1.5`, `10s`, `250ms` or `2m` (a bare number is seconds).
fn parse_duration(value: &str) -> Result<Duration, String> {
    let (number, unit_secs) = if let Some(n) = value.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix('m') {
        (n, 60.0)
    } else {
        (value, 1.0)
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n > 0.0 && n * unit_secs <= 86_400.0 => Ok(Duration::from_secs_f64(n * unit_secs)),
        _ => Err("expected a positive duration such as 10, 10s or 250ms (at most a day)".into()),
    }
}

/// Accepts `8900` and the original's `:8900`.
fn parse_port(key: &'static str, value: &str) -> Result<u16, ConfigError> {
    let digits = value.strip_prefix(':').unwrap_or(value);
    match digits.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(ConfigError::BadValue {
            key,
            value: value.to_owned(),
            reason: "expected a port from 1 to 65535, written 8900 or :8900".into(),
        }),
    }
}

fn parse_socket_protocol(raw: &mut RawIni) -> Result<SocketProtocol, ConfigError> {
    let older = raw.take("websocket_protocol");
    let (key, value) = match raw.take("socket_protocol") {
        Some(v) => ("socket_protocol", v),
        None => (
            "websocket_protocol",
            older.clone().unwrap_or_else(|| "ws".into()),
        ),
    };
    let protocol = match value.to_ascii_lowercase().as_str() {
        "websocket" | "ws" => SocketProtocol::Ws,
        "wss" => SocketProtocol::Wss,
        "tcp" => SocketProtocol::Tcp,
        _ => {
            return Err(ConfigError::BadValue {
                key,
                value,
                reason: "expected websocket, ws, wss or tcp".into(),
            });
        }
    };
    // `socket_protocol=websocket` + `websocket_protocol=wss` is how the first generation said wss.
    let older_says_wss = older.is_some_and(|v| v.eq_ignore_ascii_case("wss"));
    if protocol == SocketProtocol::Ws && older_says_wss {
        return Ok(SocketProtocol::Wss);
    }
    Ok(protocol)
}

fn parse_compression(
    raw: &mut RawIni,
) -> Result<Option<crate::codec::deflate::Deflate>, ConfigError> {
    let on = raw.boolean("websocket_compression", false)?;
    let min_size = raw.count("websocket_compression_min_size", 256, 0, 16 << 20)?;
    let level = raw.count("websocket_compression_level", 6, 1, 9)?;
    Ok(on.then_some(crate::codec::deflate::Deflate {
        level: level as u8,
        min_size: min_size as u32,
    }))
}

fn parse_path(raw: &mut RawIni, key: &'static str, default: &str) -> Result<String, ConfigError> {
    let path = raw.string(key, default);
    if !path.starts_with('/') || path.contains('?') || path.contains(char::is_whitespace) {
        return Err(ConfigError::BadValue {
            key,
            value: path,
            reason: format!("expected an absolute path such as {default}"),
        });
    }
    Ok(path)
}

fn parse_upgrade_policy(raw: &mut RawIni) -> Result<UpgradePolicy, ConfigError> {
    let path = parse_path(raw, "websocket_path", "/ws")?;
    let sse_path = parse_path(raw, "sse_path", "/sse")?;
    if sse_path == path {
        return Err(ConfigError::BadValue {
            key: "sse_path",
            value: sse_path,
            reason: "must differ from websocket_path".into(),
        });
    }
    let allowed_origins = raw
        .string("websocket_allowed_origins", "")
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect::<Vec<_>>();
    if let Some(bad) = allowed_origins
        .iter()
        .find(|o| !o.contains("://") || o.matches('*').count() > 1 || o.ends_with('/'))
    {
        return Err(ConfigError::BadValue {
            key: "websocket_allowed_origins",
            value: bad.clone(),
            reason: "expected origins such as https://app.example.com or https://*.example.com, comma-separated".into(),
        });
    }
    Ok(UpgradePolicy {
        path,
        sse_path,
        allowed_origins,
    })
}

fn parse_tcp_protocol(raw: &mut RawIni) -> Result<TcpProtocol, ConfigError> {
    let value = raw.string("tcp_protocol", "auto");
    match value.to_ascii_lowercase().as_str() {
        "auto" => Ok(TcpProtocol::Auto),
        "json" => Ok(TcpProtocol::Json),
        "resp" | "redis" => Ok(TcpProtocol::Resp),
        _ => Err(ConfigError::BadValue {
            key: "tcp_protocol",
            value,
            reason: "expected auto, json or resp".into(),
        }),
    }
}

fn parse_log_format(raw: &mut RawIni) -> Result<LogFormat, ConfigError> {
    match raw.take("log_format").as_deref() {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(ConfigError::BadValue {
            key: "log_format",
            value: other.to_owned(),
            reason: "expected text or json".into(),
        }),
    }
}

fn check_distinct_ports(
    websocket_port: u16,
    tcp_port: Option<u16>,
    wss_port: Option<u16>,
) -> Result<(), ConfigError> {
    let clash = |key, port: u16| ConfigError::BadValue {
        key,
        value: port.to_string(),
        reason: "each client port must differ from the others (websocket_port, tcp_port, wss_port)"
            .into(),
    };
    if tcp_port == Some(websocket_port) {
        return Err(clash("tcp_port", websocket_port));
    }
    if wss_port == Some(websocket_port) || (wss_port.is_some() && wss_port == tcp_port) {
        return Err(clash("wss_port", wss_port.unwrap_or_default()));
    }
    Ok(())
}

fn parse_tls_files(
    raw: &mut RawIni,
    wants_tls: bool,
) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
    let cert = raw.take("wss_cert_pem").filter(|v| !v.is_empty());
    let key = raw.take("wss_key_pem").filter(|v| !v.is_empty());
    if wants_tls {
        for (name, path) in [("wss_cert_pem", &cert), ("wss_key_pem", &key)] {
            let Some(path) = path else {
                return Err(ConfigError::Missing {
                    key: name,
                    reason: "TLS (wss, wss_port, tcp_tls) needs both wss_cert_pem and wss_key_pem",
                });
            };
            if let Err(err) = std::fs::File::open(path) {
                return Err(ConfigError::BadValue {
                    key: name,
                    value: path.clone(),
                    reason: format!("cannot read the file: {err}"),
                });
            }
        }
    }
    Ok((cert.map(PathBuf::from), key.map(PathBuf::from)))
}

/// The node's identity (`rpc_addr` as written, which forms its etcd key and is what the
/// message server dials) and the address the push RPC listens on.
fn parse_rpc_addr(raw: &mut RawIni) -> Result<(String, SocketAddr), ConfigError> {
    let host = raw.take_set("comet_rpc_addr");
    let port = raw.take_set("comet_rpc_port");
    match (raw.take_set("rpc_addr"), host, port) {
        (Some(addr), _, _) => {
            let listen = resolve_rpc_addr(&addr)?;
            Ok((addr, listen))
        }
        (None, Some(host), Some(port)) => {
            let port = parse_port("comet_rpc_port", &port)?;
            split_rpc_addr(host.trim(), port)
        }
        (None, Some(_), None) => Err(ConfigError::Missing {
            key: "comet_rpc_port",
            reason: "comet_rpc_addr needs comet_rpc_port beside it",
        }),
        // As the original: the port alone is on the loopback address.
        (None, None, Some(port)) => {
            let port = parse_port("comet_rpc_port", &port)?;
            let listen = SocketAddr::from(([127, 0, 0, 1], port));
            Ok((listen.to_string(), listen))
        }
        (None, None, None) => Ok(("127.0.0.1:8901".to_owned(), ([127, 0, 0, 1], 8901).into())),
    }
}

/// `rpc_addr`: `ip:port`, or `host:port` with a name resolved here (the original's
/// `net.Listen` took names), listened on as written.
fn resolve_rpc_addr(addr: &str) -> Result<SocketAddr, ConfigError> {
    let bad = |reason: String| ConfigError::BadValue {
        key: "rpc_addr",
        value: addr.to_owned(),
        reason,
    };
    if let Ok(listen) = addr.parse::<SocketAddr>() {
        return match listen.port() {
            0 => Err(bad("expected a port from 1 to 65535".into())),
            _ => Ok(listen),
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(bad(
            "expected host:port (it is also the node's identity)".into()
        ));
    };
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 && !host.is_empty() => port,
        _ => {
            return Err(bad(
                "expected host:port with a port from 1 to 65535 (it is also the node's identity)"
                    .into(),
            ));
        }
    };
    use std::net::ToSocketAddrs;
    match (host, port).to_socket_addrs().map(|mut found| found.next()) {
        Ok(Some(listen)) => Ok(listen),
        Ok(None) => Err(bad(format!("{host} has no address"))),
        Err(err) => Err(bad(format!("cannot resolve {host}: {err}"))),
    }
}

/// The second generation's `comet_rpc_addr` + `comet_rpc_port`: the address is what the
/// node advertises (a NAT's, a floating IP, a name), and, as the original did, the RPC
/// listens on `port` on every interface (binding the advertised address itself failed
/// where it is not on this host).
fn split_rpc_addr(host: &str, port: u16) -> Result<(String, SocketAddr), ConfigError> {
    let bad = |reason: &str| ConfigError::BadValue {
        key: "comet_rpc_addr",
        value: host.to_owned(),
        reason: reason.to_owned(),
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(bad("expected an IP address or a host name"));
    }
    match host.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => Ok((
            SocketAddr::from((v6, port)).to_string(),
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        )),
        Ok(std::net::IpAddr::V4(v4)) => Ok((
            SocketAddr::from((v4, port)).to_string(),
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
        )),
        Err(_) if host.contains(':') => Err(bad("expected an IP address or a host name")),
        Err(_) => Ok((
            format!("{host}:{port}"),
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
        )),
    }
}

fn parse_url(raw: &mut RawIni) -> Result<String, ConfigError> {
    let url = raw.string("rpc_api_url", "");
    if url.is_empty() || url.starts_with("http://") || url.starts_with("https://") {
        Ok(url)
    } else {
        Err(ConfigError::BadValue {
            key: "rpc_api_url",
            value: url,
            reason: "expected an http:// or https:// URL, or empty for no message server".into(),
        })
    }
}

fn parse_duplicate_policy(raw: &mut RawIni) -> Result<DuplicatePolicy, ConfigError> {
    match raw.take("duplicate_conn_id") {
        None => Ok(DuplicatePolicy::Reject),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "reject" => Ok(DuplicatePolicy::Reject),
            "replace" => Ok(DuplicatePolicy::Replace),
            _ => Err(ConfigError::BadValue {
                key: "duplicate_conn_id",
                value: v,
                reason: "expected reject or replace".into(),
            }),
        },
    }
}

/// etcd leases are granted in whole seconds.
fn parse_lease_ttl(raw: &mut RawIni) -> Result<Duration, ConfigError> {
    let ttl = raw.duration("etcd_lease_ttl", Duration::from_secs(3))?;
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(ConfigError::BadValue {
            key: "etcd_lease_ttl",
            value: format!("{ttl:?}"),
            reason: "etcd leases are whole seconds, at least 1".into(),
        });
    }
    Ok(ttl)
}

fn parse_overload(raw: &mut RawIni) -> Result<OverloadThresholds, ConfigError> {
    let mut limit = |key: &'static str, scale: u64| -> Result<Option<u64>, ConfigError> {
        match raw.count(key, 0, 0, usize::MAX)? {
            0 => Ok(None),
            n => Ok(Some(n as u64 * scale)),
        }
    };
    let thresholds = OverloadThresholds {
        soft_connections: limit("overload_soft_connections", 1)?,
        hard_connections: limit("overload_hard_connections", 1)?,
        soft_rss: limit("overload_soft_rss_mb", 1 << 20)?,
        hard_rss: limit("overload_hard_rss_mb", 1 << 20)?,
        soft_queued: limit("overload_soft_queued", 1)?,
        hard_queued: limit("overload_hard_queued", 1)?,
    };
    let pairs = [
        (
            "overload_hard_connections",
            thresholds.soft_connections,
            thresholds.hard_connections,
        ),
        (
            "overload_hard_rss_mb",
            thresholds.soft_rss,
            thresholds.hard_rss,
        ),
        (
            "overload_hard_queued",
            thresholds.soft_queued,
            thresholds.hard_queued,
        ),
    ];
    for (key, soft, hard) in pairs {
        if let (Some(soft), Some(hard)) = (soft, hard)
            && hard < soft
        {
            return Err(ConfigError::BadValue {
                key,
                value: hard.to_string(),
                reason: "the hard threshold must not be below the soft one".into(),
            });
        }
    }
    Ok(thresholds)
}

fn parse_admin_addr(raw: &mut RawIni) -> Result<Option<SocketAddr>, ConfigError> {
    let value = raw.string("admin_addr", "");
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| ConfigError::BadValue {
        key: "admin_addr",
        value,
        reason: "expected ip:port, e.g. 127.0.0.1:8902".into(),
    })
}

/// Shortest signing secret accepted, current or previous.
const MIN_TOKEN_SECRET_BYTES: usize = 16;

fn parse_token_secrets(raw: &mut RawIni) -> Result<Vec<Vec<u8>>, ConfigError> {
    let current = raw.string("token_secret", "");
    let previous = raw.string("token_secret_previous", "");
    if current.is_empty() && !previous.is_empty() {
        return Err(ConfigError::Missing {
            key: "token_secret",
            reason: "token_secret_previous is only used beside a current token_secret",
        });
    }
    // The previous secret still verifies tokens (and they are accepted as current ones),
    // so a short one is as guessable as a short current one.
    for (key, secret) in [
        ("token_secret", &current),
        ("token_secret_previous", &previous),
    ] {
        if !secret.is_empty() && secret.len() < MIN_TOKEN_SECRET_BYTES {
            return Err(ConfigError::BadValue {
                key,
                value: "(hidden)".into(),
                reason: format!("use at least {MIN_TOKEN_SECRET_BYTES} bytes of secret"),
            });
        }
    }
    Ok([current, previous]
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(String::into_bytes)
        .collect())
}

fn parse_endpoints(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl fmt::Display for DuplicatePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DuplicatePolicy::Reject => "reject",
            DuplicatePolicy::Replace => "replace",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_window_past_the_outbound_queue_is_warned_of() {
        let (_, warnings) = Config::parse("recovery_window=64\noutbound_queue_size=32\n").unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("slow consumer"), "{warnings:?}");
        let (_, warnings) = Config::parse("recovery_window=32\noutbound_queue_size=32\n").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn first_generation_file_parses() {
        let text = "max_proc=2\ncomet_service_name=comet\netcd_addr=127.0.0.1:2379\n\
            rpc_api_url=http://msg.demo.com/im/index/rpc\nrpc_user_agent=\"CtxImRpc 1.0\"\n\
            socket_protocol=websocket\nwebsocket_host=comet.demo.com\nwebsocket_port=:8900\n\
            websocket_protocol=ws\n# wss_cert_pem=/path/fullchain.pem\nrpc_addr=10.0.1.131:8901\n";
        let (config, warnings) = Config::parse(text).unwrap();
        // The original's files had no RPC token: they start, with the warning.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("INSECURE"), "{warnings:?}");
        assert_eq!(config.max_proc, 2);
        assert_eq!(config.rpc_user_agent, "CtxImRpc 1.0");
        assert_eq!(config.websocket_port, 8900);
        assert_eq!(config.rpc_addr, "10.0.1.131:8901");
        assert_eq!(config.etcd_endpoints, vec!["127.0.0.1:2379"]);
        assert_eq!(config.comet_addr(), "ws://comet.demo.com:8900");
    }

    #[test]
    fn second_generation_split_rpc_addr_and_token() {
        let text = "comet_rpc_addr=192.168.3.165\ncomet_rpc_port=8901\ncomet_rpc_token=token\n\
            etcd_addr=10.0.0.1:2379, 10.0.0.2:2379\n";
        let (config, _) = Config::parse(text).unwrap();
        assert_eq!(config.rpc_addr, "192.168.3.165:8901");
        assert_eq!(config.comet_rpc_token, "token");
        assert_eq!(config.etcd_endpoints.len(), 2);
        // Advertised as written, listened on every interface, as the original did.
        assert_eq!(config.rpc_listen, "0.0.0.0:8901".parse().unwrap());
        let (named, _) =
            Config::parse("comet_rpc_addr=message.demo.com\ncomet_rpc_port=:8901\n").unwrap();
        assert_eq!(named.rpc_addr, "message.demo.com:8901");
        assert_eq!(named.rpc_listen, "0.0.0.0:8901".parse().unwrap());
        let (v6, _) = Config::parse("comet_rpc_addr=fd00::5\ncomet_rpc_port=8901\n").unwrap();
        assert_eq!(v6.rpc_addr, "[fd00::5]:8901");
        assert_eq!(v6.rpc_listen, "[::]:8901".parse().unwrap());
        let (alone, _) = Config::parse("comet_rpc_port=9001\n").unwrap();
        assert_eq!(alone.rpc_addr, "127.0.0.1:9001");
        assert_eq!(alone.rpc_listen, "127.0.0.1:9001".parse().unwrap());
    }

    #[test]
    fn inline_comments_and_empty_numbers_read_as_the_original_read_them() {
        let text = "max_proc = 2 ; cores\nrpc_user_agent = \"Ctx ;Im\" # quoted\n\
            rpc_api_url=http://msg.demo.com/rpc#frag\nwebsocket_port=\nping_interval=\n\
            comet_rpc_token=\n";
        let (config, _) = Config::parse(text).unwrap();
        assert_eq!(config.max_proc, 2);
        assert_eq!(config.rpc_user_agent, "Ctx ;Im");
        assert_eq!(config.rpc_api_url, "http://msg.demo.com/rpc#frag");
        assert_eq!(config.websocket_port, 8900, "empty: the default");
        assert_eq!(config.ping_interval, Duration::from_secs(9));
        assert_eq!(config.comet_rpc_token, "", "an empty string stays empty");
    }

    #[test]
    fn rpc_addr_may_name_a_host() {
        let (config, _) = Config::parse("rpc_addr=localhost:8901\n").unwrap();
        assert_eq!(config.rpc_addr, "localhost:8901", "the identity as written");
        assert!(config.rpc_listen.ip().is_loopback());
        assert_eq!(config.rpc_listen.port(), 8901);
        for bad in [
            "rpc_addr=localhost",
            "rpc_addr=localhost:0",
            "rpc_addr=:8901",
        ] {
            let err = Config::parse(bad).unwrap_err().to_string();
            assert!(err.contains("rpc_addr"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("websocket_port=99999", "websocket_port"),
            ("socket_protocol=carrier-pigeon", "socket_protocol"),
            ("rpc_addr=nowhere", "rpc_addr"),
            ("max_frame_size=x", "max_frame_size"),
            (
                "ping_interval=20\nheartbeat_timeout=10",
                "heartbeat_timeout",
            ),
            ("socket_protocol=wss", "wss_cert_pem"),
            ("comet_rpc_addr=1.2.3.4", "comet_rpc_port"),
            ("duplicate_conn_id=maybe", "duplicate_conn_id"),
            ("admin_addr=0.0.0.0:8902", "admin_token"),
            ("admin_addr=localhost", "admin_addr"),
            ("token_secret=short", "token_secret"),
            (
                "token_secret=0123456789abcdef\ntoken_secret_previous=x",
                "token_secret_previous",
            ),
            ("rpc_max_connections=0", "rpc_max_connections"),
            ("rpc_preauth_request_size=10", "rpc_preauth_request_size"),
            ("rpc_first_call_timeout=0", "rpc_first_call_timeout"),
            ("callback_queue_size=0", "callback_queue_size"),
            ("io_uring_depth=65536", "io_uring_depth"),
        ];
        for (text, key) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err:?}");
        }
    }

    #[test]
    fn an_exposed_rpc_without_token_starts_with_a_warning() {
        let (config, warnings) = Config::parse("rpc_addr=0.0.0.0:8901\n").unwrap();
        assert!(config.rpc_open_to_anyone());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("INSECURE"), "{warnings:?}");
        for quiet in [
            "rpc_addr=0.0.0.0:8901\ncomet_rpc_token=secret\n",
            "rpc_addr=127.0.0.1:8901\n",
        ] {
            let (config, warnings) = Config::parse(quiet).unwrap();
            assert!(!config.rpc_open_to_anyone(), "{quiet:?}");
            assert!(warnings.is_empty(), "{quiet:?}: {warnings:?}");
        }
    }

    #[test]
    fn syntax_error_names_the_line() {
        let err = Config::parse("max_proc=1\nthis is not ini\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let (_, warnings) = Config::parse("colour=blue\n").unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("colour"));
        assert!(!warnings[0].contains("did you mean"), "{warnings:?}");
    }

    #[test]
    fn a_mistyped_key_suggests_the_nearest_known_one() {
        let (_, warnings) = Config::parse("max_proc=1\netcd_adr=127.0.0.1:2379\n").unwrap();
        assert_eq!(
            warnings,
            ["config line 2: unknown key `etcd_adr` ignored (did you mean `etcd_addr`?)"]
        );
        let (_, warnings) = Config::parse("ping_intervall=5\n").unwrap();
        assert!(warnings[0].contains("`ping_interval`"), "{warnings:?}");
    }

    #[test]
    fn a_bad_value_names_its_line() {
        let err = Config::parse("# comment\nmax_proc=1\n\nping_interval=soon\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config line 4: config key `ping_interval`"),
            "{text}"
        );
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("etcd_adr", "etcd_addr"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn durations_accept_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn example_file_documents_only_known_keys() {
        let (_, warnings) = Config::parse(include_str!("../comet.example.ini")).unwrap();
        // (It may warn about its rpc_addr without a token: it is an example.)
        let unknown: Vec<_> = warnings
            .iter()
            .filter(|w| w.contains("unknown key"))
            .collect();
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    #[test]
    fn embedded_default_is_standalone() {
        let (config, warnings) = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert!(warnings.is_empty());
        assert!(config.etcd_endpoints.is_empty());
        assert!(config.rpc_api_url.is_empty());
    }
}
