//! The push RPC methods of COMPAT.md section 6, in every generation's shape.
//!
//! Each method turns one decoded parameter into the reply the original sent for it.
//! Delivery itself is [`Node`]'s; this module owns the shapes, the token check and the
//! error texts. It runs on the control thread.

use std::collections::HashSet;

use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use super::codec::Request;
use crate::control::Node;
use crate::link::PushOutcome;

/// Newest-generation status codes.
mod code {
    pub const OK: u32 = 20000;
    pub const BAD_PARAMS: u32 = 40000;
    pub const BAD_TOKEN: u32 = 40100;
    pub const SOME_FAILED: u32 = 50001;
}

/// Recipients handed to the node per slice of a large push. The fan-out of one slice
/// (directory lookups, per-shard lists) holds the control thread; between slices its
/// other tasks run, among them the conn_id claims that handshakes wait for. One push to
/// 350,000 recipients in one piece held it 2.5 s in a debug build, long enough for
/// handshakes' claims to time out.
pub(crate) const PUSH_SLICE: usize = 16 * 1024;

/// Lists at least this long are turned into reply text on tokio's blocking pool: the
/// failure text naming 350,000 ids took 2.6 s of the control thread (debug build).
const OFF_THREAD_IDS: usize = 10_000;

/// Delivers `msg` to `ids` (each once), a large list in slices; returns the failed ids
/// and those only kept in a recovery buffer.
async fn push_in_slices(node: &Node, ids: Vec<String>, msg: &str) -> PushOutcome {
    if ids.len() <= PUSH_SLICE {
        return node.push(&ids, msg).await;
    }
    // `Node::push` counts a duplicate once within one call; across slices that is ours
    // to do (off the thread: it hashes every id).
    let unique = tokio::task::spawn_blocking(move || {
        let mut seen = HashSet::with_capacity(ids.len());
        ids.into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut outcome = PushOutcome::default();
    for slice in unique.chunks(PUSH_SLICE) {
        let part = node.push(slice, msg).await;
        outcome.failed.extend(part.failed);
        outcome.buffered.extend(part.buffered);
        tokio::task::yield_now().await;
    }
    outcome
}

/// `{"<ids_key>": ids, "<text_key>": text}` as text, a long list off the thread.
async fn failure_text(
    ids: Vec<String>,
    ids_key: &'static str,
    text_key: &'static str,
    text: &str,
) -> String {
    let text = text.to_owned();
    let long = ids.len() >= OFF_THREAD_IDS;
    let build = move || {
        let mut object = Map::new();
        object.insert(ids_key.into(), json!(ids));
        object.insert(text_key.into(), json!(text));
        Value::Object(object).to_string()
    };
    if !long {
        return build();
    }
    tokio::task::spawn_blocking(build).await.unwrap_or_default()
}

/// Answers one call: `Ok(result)` or `Err(error string)`, as Go's jsonrpc replies.
/// Push calls are timed into `comet_push_latency_seconds`.
pub async fn dispatch(node: &Node, method: &str, param: Value) -> Result<Value, String> {
    let name = method.strip_prefix("Server.").unwrap_or(method);
    let started = std::time::Instant::now();
    let result = dispatch_named(node, name, method, param).await;
    if matches!(name, "SendToConnections" | "Broadcast" | "SendToGroup") {
        node.observe_push_latency(started.elapsed());
    }
    result
}

async fn dispatch_named(
    node: &Node,
    name: &str,
    method: &str,
    param: Value,
) -> Result<Value, String> {
    match name {
        "SendToConnections" => match param {
            Value::String(inner) => send_first_generation(node, inner).await,
            Value::Object(fields) => send_second_generation(node, Fields(fields)).await,
            other => Err(format!(
                "SendToConnections takes a JSON string or object, found {}",
                type_name(&other)
            )),
        },
        "KickConnections" => kick(node, &Fields::from(param)?).await,
        "Broadcast" => Ok(enveloped(broadcast(node, &Fields::from(param)?).await)),
        "CheckConnectionsOnline" => Ok(enveloped(check_online(node, &Fields::from(param)?))),
        "GetAllConnections" => Ok(enveloped(
            authorised(node, &Fields::from(param)?).map(|()| json!(node.all_connections())),
        )),
        "GetNode" => Ok(enveloped(match authorised(node, &Fields::from(param)?) {
            Ok(()) => Ok(node.describe().await),
            Err(refused) => Err(refused),
        })),
        "JoinGroup" => Ok(enveloped(
            change_group(node, &Fields::from(param)?, Membership::Join).await,
        )),
        "LeaveGroup" => Ok(enveloped(
            change_group(node, &Fields::from(param)?, Membership::Leave).await,
        )),
        "SendToGroup" => Ok(enveloped(send_to_group(node, &Fields::from(param)?).await)),
        "Status" => Ok(enveloped(match authorised(node, &Fields::from(param)?) {
            Ok(()) => Ok(node.status().await),
            Err(refused) => Err(refused),
        })),
        _ => Err(format!("rpc: can't find method {method}")),
    }
}

/// Whether a call carries the right `comet_rpc_token` (any call does when none is set):
/// such a call lifts its connection's pre-authentication bounds. A first-generation call
/// carries its token inside a JSON string, parsed here once more; this is only asked
/// until a connection has authenticated, and off the control thread for a large request.
/// `expected` is `comet_rpc_token`.
pub(crate) fn authenticates(expected: &str, request: &Request) -> bool {
    if expected.is_empty() {
        return true;
    }
    let token = match &request.param {
        Value::Object(fields) => text_of(fields, "token"),
        Value::String(inner) => match serde_json::from_str::<Value>(inner) {
            Ok(Value::Object(fields)) => text_of(&fields, "token"),
            _ => return false,
        },
        _ => return false,
    };
    bool::from(expected.as_bytes().ct_eq(token.as_bytes()))
}

/// A field of a parameter object as text (see [`Fields::text`]).
fn text_of(fields: &Map<String, Value>, name: &str) -> String {
    let value = fields
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value);
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A parameter object whose field names match case-insensitively (Go's decoder does).
struct Fields(Map<String, Value>);

impl Fields {
    fn from(param: Value) -> Result<Fields, String> {
        match param {
            Value::Object(fields) => Ok(Fields(fields)),
            Value::Null => Ok(Fields(Map::new())),
            other => Err(format!(
                "params must be an object, found {}",
                type_name(&other)
            )),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    fn text(&self, name: &str) -> String {
        text_of(&self.0, name)
    }

    /// Like [`Fields::ids`], moving the ids out instead of copying them (a push may name
    /// a million; copying them took 0.3 s of the control thread per 350,000, debug build).
    fn take_ids(&mut self, name: &str) -> Result<Vec<String>, String> {
        let Some(key) = self
            .0
            .keys()
            .find(|key| key.eq_ignore_ascii_case(name))
            .cloned()
        else {
            return Ok(Vec::new());
        };
        match self.0.remove(&key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(format!(
                        "{name} must hold strings, found {}",
                        type_name(&other)
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "{name} must be an array, found {}",
                type_name(&other)
            )),
        }
    }

    fn ids(&self, name: &str) -> Result<Vec<String>, String> {
        match self.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    Value::Number(n) => Ok(n.to_string()),
                    other => Err(format!(
                        "{name} must hold strings, found {}",
                        type_name(other)
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "{name} must be an array, found {}",
                type_name(other)
            )),
        }
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Constant-time comparison against `comet_rpc_token`; any token passes when none is set.
fn token_ok(node: &Node, given: &str) -> bool {
    let expected = node.config.comet_rpc_token.as_bytes();
    expected.is_empty() || bool::from(expected.ct_eq(given.as_bytes()))
}

/// First generation: `P` is a string holding `{"to": [...], "msg": "..."}`.
async fn send_first_generation(node: &Node, inner: String) -> Result<Value, String> {
    let failure =
        |ids: &[String], info: &str| Err(json!({"error_ids": ids, "error_info": info}).to_string());
    // A large inner request is parsed off the control thread, like a large request.
    let parsed = if inner.len() < super::PARSE_OFF_THREAD_BYTES {
        serde_json::from_str::<Value>(&inner).ok()
    } else {
        tokio::task::spawn_blocking(move || serde_json::from_str::<Value>(&inner).ok())
            .await
            .ok()
            .flatten()
    };
    let mut fields = match parsed {
        Some(Value::Object(fields)) => Fields(fields),
        _ => return failure(&[], "param is not a JSON object string"),
    };
    if !token_ok(node, &fields.text("token")) {
        return failure(&[], "token error.");
    }
    let to = match fields.take_ids("to") {
        Ok(to) if !to.is_empty() => to,
        Ok(_) => return failure(&[], "to is empty."),
        Err(why) => return failure(&[], &why),
    };
    let msg = fields.text("msg");
    if msg.is_empty() {
        return failure(&[], "msg is empty.");
    }
    let failed = push_in_slices(node, to, &msg).await.failed;
    if failed.is_empty() {
        Ok(json!("ok"))
    } else {
        Err(failure_text(
            failed,
            "error_ids",
            "error_info",
            "some connections could not be reached",
        )
        .await)
    }
}

/// Second generation: `{"connections": [...], "msg": "...", "token": "..."}`.
async fn send_second_generation(node: &Node, mut fields: Fields) -> Result<Value, String> {
    let failure = |ids: &[String], msg: &str| Err(json!({"ids": ids, "msg": msg}).to_string());
    if !token_ok(node, &fields.text("token")) {
        return failure(&[], "token error.");
    }
    let connections = match fields.take_ids("connections") {
        Ok(ids) if !ids.is_empty() => ids,
        Ok(_) => return failure(&[], "connections is empty."),
        Err(why) => return failure(&[], &why),
    };
    let msg = fields.text("msg");
    if msg.is_empty() {
        return failure(&[], "msg is empty.");
    }
    let PushOutcome { failed, buffered } = push_in_slices(node, connections, &msg).await;
    // `buffered` (recovery, docs/PROTOCOL.md): only when some ids were kept for a client
    // away, so a node without recovery answers exactly as before.
    match (failed.is_empty(), buffered.is_empty()) {
        (true, true) => Ok(json!("ok")),
        (true, false) => Ok(json!({"buffered": buffered})),
        (false, true) => Err(failure_text(
            failed,
            "ids",
            "msg",
            "some connections could not be reached.",
        )
        .await),
        (false, false) => Err(json!({
            "ids": failed,
            "msg": "some connections could not be reached.",
            "buffered": buffered,
        })
        .to_string()),
    }
}

async fn kick(node: &Node, fields: &Fields) -> Result<Value, String> {
    if !token_ok(node, &fields.text("token")) {
        return Err(json!({"ids": [], "msg": "token error."}).to_string());
    }
    let connections = fields.ids("connections")?;
    if connections.is_empty() {
        return Err(json!({"ids": [], "msg": "connections is empty."}).to_string());
    }
    node.kick(&connections).await;
    Ok(json!("ok"))
}

/// A newest-generation failure: its code, its text, and any data worth returning (the
/// ids that failed).
struct Failure {
    code: u32,
    error: String,
    data: Value,
}

impl Failure {
    fn new(code: u32, error: impl Into<String>) -> Failure {
        Failure {
            code,
            error: error.into(),
            data: Value::Null,
        }
    }
}

/// A newest-generation answer before it is wrapped: `Ok(data)` or a failure.
type Enveloped = Result<Value, Failure>;

fn enveloped(answer: Enveloped) -> Value {
    match answer {
        Ok(data) => json!({"code": code::OK, "data": data, "error": ""}),
        Err(failure) => json!({"code": failure.code, "data": failure.data, "error": failure.error}),
    }
}

fn authorised(node: &Node, fields: &Fields) -> Result<(), Failure> {
    if token_ok(node, &fields.text("token")) {
        Ok(())
    } else {
        Err(Failure::new(code::BAD_TOKEN, "token error."))
    }
}

/// `data` as the answer, or a 50001 failure carrying it when `failed` is not empty.
fn partial(data: Value, failed: &[String], what: &str) -> Enveloped {
    if failed.is_empty() {
        return Ok(data);
    }
    Err(Failure {
        code: code::SOME_FAILED,
        error: format!("{} connections {what}", failed.len()),
        data,
    })
}

async fn broadcast(node: &Node, fields: &Fields) -> Enveloped {
    authorised(node, fields)?;
    let msg = fields.text("msg");
    if msg.is_empty() {
        return Err(Failure::new(code::BAD_PARAMS, "msg is empty."));
    }
    let outcome = node.broadcast(&msg).await;
    let data = json!({"delivered": outcome.delivered, "failed": outcome.failed});
    partial(data, &outcome.failed, "could not be reached")
}

fn group_name(fields: &Fields) -> Result<String, Failure> {
    let group = fields.text("group");
    if group.is_empty() {
        return Err(Failure::new(code::BAD_PARAMS, "group is empty."));
    }
    Ok(group)
}

enum Membership {
    Join,
    Leave,
}

async fn change_group(node: &Node, fields: &Fields, change: Membership) -> Enveloped {
    authorised(node, fields)?;
    let group = group_name(fields)?;
    let connections = fields
        .ids("connections")
        .map_err(|why| Failure::new(code::BAD_PARAMS, why))?;
    if connections.is_empty() {
        return Err(Failure::new(code::BAD_PARAMS, "connections is empty."));
    }
    let not_found = match change {
        Membership::Join => node.join_group(&group, &connections).await,
        Membership::Leave => node.leave_group(&group, &connections).await,
    };
    let data = json!({"group": group, "not_found": not_found});
    partial(data, &not_found, "are not on this node")
}

async fn send_to_group(node: &Node, fields: &Fields) -> Enveloped {
    authorised(node, fields)?;
    let group = group_name(fields)?;
    let msg = fields.text("msg");
    if msg.is_empty() {
        return Err(Failure::new(code::BAD_PARAMS, "msg is empty."));
    }
    let outcome = node.group_push(&group, &msg).await;
    let data = json!({"group": group, "delivered": outcome.delivered, "failed": outcome.failed});
    partial(data, &outcome.failed, "could not be reached")
}

fn check_online(node: &Node, fields: &Fields) -> Enveloped {
    authorised(node, fields)?;
    let connections = fields
        .ids("connections")
        .map_err(|why| Failure::new(code::BAD_PARAMS, why))?;
    Ok(json!(node.online(&connections)))
}
