//! Forwarding pushes between the two processes of a zero-downtime restart.
//!
//! After a hand-over the draining process still answers the RPC connections it accepted
//! before, but its clients are moving to the successor: a push for an id it no longer
//! holds (or that its shard could not reach because the client was being closed) is sent
//! on, as one second-generation `SendToConnections`, to the successor's peer listener,
//! and the ids the successor could not reach either are the ones reported failed. Without
//! it about half of all pushes failed during each drain (~5,000 per restart at 2,000/s).
//! The successor does the same the other way for the RPC connections it accepts while
//! the predecessor drains (a message server that connects per call lands there), until
//! the predecessor's peer listener refuses.
//!
//! Owns one RPC connection to the other process, opened on first use and used for one
//! call at a time (calls queue in order, so two pushes to one client reach it in the
//! order they were sent). Runs on the control thread; every wait is bounded, and any
//! failure reports the forwarded ids failed and drops the connection (the next call
//! opens one). A call that arrives on a peer listener is never forwarded again
//! (`control::Route::HereOnly`), so nothing can loop.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

use crate::control::Membership;
use crate::handover::ForwardTarget;
use crate::link::{BroadcastOutcome, PushOutcome};

/// Longest wait to connect to the other process (it is on this host, listening already).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for its reply: a push to a few thousand ids takes milliseconds, and its
/// own shard waits give up after 10 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(12);
/// The largest reply read (it names at most the ids we sent, each escaped JSON).
const MAX_REPLY_BYTES: u64 = 64 * 1024 * 1024;

/// Why one forwarded call failed (its ids are then reported failed).
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("cannot connect to the other process at {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("the other process at {0} refused the connection: it has no peer listener any more")]
    Refused(SocketAddr),
    #[error("the other process did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the other process failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the other process closed the connection")]
    Closed,
    #[error("unreadable reply from the other process: {0}")]
    BadReply(String),
}

struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

/// One process's line to the other's peer listener.
pub(crate) struct Forwarder {
    target: ForwardTarget,
    connection: Mutex<Option<Connection>>,
    next_id: std::cell::Cell<u64>,
    /// The other process refused a connection: it has exited, or closed its peer
    /// listener because it has nothing left to take.
    gone: std::cell::Cell<bool>,
}

impl Forwarder {
    pub(crate) fn new(target: ForwardTarget) -> Forwarder {
        Forwarder {
            target,
            connection: Mutex::new(None),
            next_id: std::cell::Cell::new(1),
            gone: std::cell::Cell::new(false),
        }
    }

    /// Opens the connection now, before any stranger on this host has found the other
    /// process's peer listener and filled its connection slots; it then stays open.
    pub(crate) async fn open(&self) {
        let mut connection = self.connection.lock().await;
        if connection.is_none() {
            match self.connect().await {
                Ok(opened) => *connection = Some(opened),
                Err(err) => {
                    tracing::warn!(error = %err, "no connection to the other process of the restart yet")
                }
            }
        }
    }

    /// Whether the other process refused a connection (see [`Forwarder::gone`]).
    pub(crate) fn is_gone(&self) -> bool {
        self.gone.get()
    }

    /// Pushes `msg` to `ids` through the other process; returns the ids it did not reach
    /// (all of them when it could not be asked) and those it kept in a recovery buffer.
    pub(crate) async fn push(&self, ids: Vec<String>, msg: &str) -> PushOutcome {
        if ids.is_empty() {
            return PushOutcome::default();
        }
        let param = json!({"connections": ids, "msg": msg});
        match self.exchange("Server.SendToConnections", param).await {
            Some(reply) => push_outcome(&reply, &ids),
            None => PushOutcome {
                failed: ids,
                buffered: Vec::new(),
            },
        }
    }

    /// Broadcasts `msg` to the other process's clients (`group`: to its members of that
    /// group); `None` if it could not be asked.
    pub(crate) async fn broadcast(
        &self,
        group: Option<&str>,
        msg: &str,
    ) -> Option<BroadcastOutcome> {
        let reply = match group {
            None => {
                self.exchange("Server.Broadcast", json!({"msg": msg}))
                    .await?
            }
            Some(group) => {
                let param = json!({"group": group, "msg": msg});
                self.exchange("Server.SendToGroup", param).await?
            }
        };
        let data = enveloped_data(&reply)?;
        Some(BroadcastOutcome {
            delivered: data.get("delivered")?.as_u64()? as usize,
            failed: strings(data.get("failed")?)?,
        })
    }

    /// Closes those of `ids` the other process holds.
    pub(crate) async fn kick(&self, ids: &[String]) {
        if !ids.is_empty() {
            self.exchange("Server.KickConnections", json!({"connections": ids}))
                .await;
        }
    }

    /// Joins (or leaves) `group` for those of `ids` the other process holds; returns the
    /// ids it does not hold either (all of them when it could not be asked).
    pub(crate) async fn change_group(
        &self,
        change: Membership,
        group: &str,
        ids: Vec<String>,
    ) -> Vec<String> {
        if ids.is_empty() {
            return ids;
        }
        let method = match change {
            Membership::Join => "Server.JoinGroup",
            Membership::Leave => "Server.LeaveGroup",
        };
        let param = json!({"group": group, "connections": ids});
        let not_found = self
            .exchange(method, param)
            .await
            .and_then(|reply| strings(enveloped_data(&reply)?.get("not_found")?));
        not_found.unwrap_or(ids)
    }

    /// One call to the other process, with its token added to `param`; the reply object,
    /// or `None` when it could not be had (logged; the connection is dropped, and a
    /// refused connect marks the other process gone).
    async fn exchange(&self, method: &str, mut param: Value) -> Option<Value> {
        param["token"] = json!(self.target.token);
        let mut connection = self.connection.lock().await;
        let reused = connection.is_some();
        let mut answer = self.call(&mut connection, method, &param).await;
        // The other process closes only idle connections (every call read answered), so a
        // kept connection that turns out closed before any reply did not run the call:
        // once more on a fresh one (a kick must not be skipped for a stale connection).
        if reused && matches!(answer, Err(ForwardError::Closed | ForwardError::Io(_))) {
            *connection = None;
            answer = self.call(&mut connection, method, &param).await;
        }
        match answer {
            Ok(reply) => Some(reply),
            Err(err) => {
                // Only a refusal says it is gone; a timeout or a lack of descriptors
                // during a reconnect storm does not.
                if matches!(err, ForwardError::Refused(_)) {
                    self.gone.set(true);
                }
                tracing::warn!(method, error = %err, "call not forwarded to the other process of the restart; its ids are reported failed");
                *connection = None;
                None
            }
        }
    }

    async fn call(
        &self,
        connection: &mut Option<Connection>,
        method: &str,
        param: &Value,
    ) -> Result<Value, ForwardError> {
        if connection.is_none() {
            *connection = Some(self.connect().await?);
        }
        let Some(connection) = connection.as_mut() else {
            return Err(ForwardError::Closed);
        };
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let mut request = json!({"method": method, "params": [param], "id": id})
            .to_string()
            .into_bytes();
        request.push(b'\n');
        let exchange = async {
            connection.writer.write_all(&request).await?;
            let mut line = Vec::new();
            (&mut connection.reader)
                .take(MAX_REPLY_BYTES)
                .read_until(b'\n', &mut line)
                .await?;
            Ok::<_, ForwardError>(line)
        };
        let line = tokio::time::timeout(REPLY_TIMEOUT, exchange)
            .await
            .map_err(|_| ForwardError::Timeout(REPLY_TIMEOUT))??;
        if line.last() != Some(&b'\n') {
            return Err(ForwardError::Closed);
        }
        reply_to(&line, id)
    }

    async fn connect(&self) -> Result<Connection, ForwardError> {
        let addr = self.target.addr;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                ForwardError::Connect(addr, format!("timed out after {CONNECT_TIMEOUT:?}"))
            })?
            .map_err(|err| match err.kind() {
                std::io::ErrorKind::ConnectionRefused => ForwardError::Refused(addr),
                _ => ForwardError::Connect(addr, err.to_string()),
            })?;
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        Ok(Connection {
            reader: BufReader::new(reader),
            writer,
        })
    }
}

/// The reply object in `line`, checked to answer call `id`.
fn reply_to(line: &[u8], id: u64) -> Result<Value, ForwardError> {
    let reply: Value = serde_json::from_slice(line).map_err(|err| {
        ForwardError::BadReply(format!("{err}: {}", crate::callback::escaped_prefix(line)))
    })?;
    if reply.get("id") != Some(&json!(id)) {
        return Err(ForwardError::BadReply(format!(
            "reply to another call: {}",
            crate::callback::escaped_prefix(line)
        )));
    }
    Ok(reply)
}

/// What a second-generation `SendToConnections` reply says: nothing failed for `"ok"`,
/// the ids kept for clients away for `{"buffered": [...]}`; for an error object, its
/// `ids` failed and its `buffered` kept; all of `sent` failed for an error without ids
/// (a refused token, say).
fn push_outcome(reply: &Value, sent: &[String]) -> PushOutcome {
    let result = reply.get("result").unwrap_or(&Value::Null);
    if result == &json!("ok") {
        return PushOutcome::default();
    }
    if let Some(buffered) = result.get("buffered").and_then(strings) {
        return PushOutcome {
            failed: Vec::new(),
            buffered,
        };
    }
    let error = reply.get("error").and_then(Value::as_str).unwrap_or("");
    let object = serde_json::from_str::<Value>(error).ok();
    let listed = object.as_ref().and_then(|e| strings(e.get("ids")?));
    let buffered = object
        .as_ref()
        .and_then(|e| strings(e.get("buffered")?))
        .unwrap_or_default();
    match listed {
        Some(failed) if !failed.is_empty() => PushOutcome { failed, buffered },
        _ => {
            tracing::warn!(error = %crate::callback::escaped_prefix(error.as_bytes()), "the other process refused a forwarded push");
            PushOutcome {
                failed: sent.to_vec(),
                buffered: Vec::new(),
            }
        }
    }
}

/// The `data` of a newest-generation reply (`{"code", "data", "error"}`) when its code
/// is 20000 or 50001 (some ids failed); `None` for a refusal (logged).
fn enveloped_data(reply: &Value) -> Option<&Value> {
    let result = reply.get("result")?;
    match result.get("code").and_then(Value::as_u64) {
        Some(20000 | 50001) => result.get("data"),
        _ => {
            tracing::warn!(reply = %result, "the other process refused a forwarded call");
            None
        }
    }
}

/// A JSON array of strings.
fn strings(value: &Value) -> Option<Vec<String>> {
    value
        .as_array()?
        .iter()
        .map(|id| id.as_str().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn reply(line: &[u8]) -> Value {
        reply_to(line, 3).unwrap()
    }

    fn outcome(failed: &[&str], buffered: &[&str]) -> PushOutcome {
        PushOutcome {
            failed: failed.iter().map(|s| s.to_string()).collect(),
            buffered: buffered.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn replies_name_the_failed_and_the_buffered_ids() {
        let ok = reply(br#"{"id":3,"result":"ok","error":null}"#);
        assert_eq!(push_outcome(&ok, &sent()), outcome(&[], &[]));
        let some = reply(br#"{"id":3,"result":null,"error":"{\"ids\":[\"b\"],\"msg\":\"x\"}"}"#);
        assert_eq!(push_outcome(&some, &sent()), outcome(&["b"], &[]));
        let kept = reply(br#"{"id":3,"result":{"buffered":["a"]},"error":null}"#);
        assert_eq!(push_outcome(&kept, &sent()), outcome(&[], &["a"]));
        let both = reply(
            br#"{"id":3,"result":null,"error":"{\"ids\":[\"b\"],\"msg\":\"x\",\"buffered\":[\"a\"]}"}"#,
        );
        assert_eq!(push_outcome(&both, &sent()), outcome(&["b"], &["a"]));
        let refused =
            reply(br#"{"id":3,"result":null,"error":"{\"ids\":[],\"msg\":\"token error.\"}"}"#);
        assert_eq!(push_outcome(&refused, &sent()), outcome(&["a", "b"], &[]));
    }

    #[test]
    fn a_reply_to_another_call_or_garbage_is_an_error() {
        assert!(reply_to(br#"{"id":4,"result":"ok","error":null}"#, 3).is_err());
        assert!(reply_to(b"\x1b[31m", 3).is_err());
    }

    #[test]
    fn newest_generation_data_is_read_only_from_an_answer() {
        let partial = reply(
            br#"{"id":3,"result":{"code":50001,"data":{"delivered":2,"failed":["x"]},"error":"1 connections could not be reached"},"error":null}"#,
        );
        let data = enveloped_data(&partial).unwrap();
        assert_eq!(data["delivered"], json!(2));
        assert_eq!(strings(&data["failed"]), Some(vec!["x".to_owned()]));
        let refused = reply(
            br#"{"id":3,"result":{"code":40100,"data":null,"error":"token error."},"error":null}"#,
        );
        assert!(enveloped_data(&refused).is_none());
        assert_eq!(strings(&json!(["a", 1])), None);
    }
}
