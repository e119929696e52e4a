//! The push RPC methods of COMPAT.md section 6, in every generation's shape.
//!
//! Each method turns one decoded parameter into the reply the original sent for it.
//! Delivery itself is [`Node`]'s; this module owns the shapes, the token check and the
//! error texts. It runs on the control thread.

use std::collections::HashSet;

use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use super::codec::{Request, parse_value};
use crate::control::{Membership, Node, Route};
use crate::link::PushOutcome;

/// Newest-generation status codes.
mod code {
    pub(crate) const OK: u32 = 20000;
    pub(crate) const BAD_PARAMS: u32 = 40000;
    pub(crate) const BAD_TOKEN: u32 = 40100;
    pub(crate) const SOME_FAILED: u32 = 50001;
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
async fn push_in_slices(node: &Node, ids: Vec<String>, msg: &str, route: Route) -> PushOutcome {
    if ids.len() <= PUSH_SLICE {
        return node.push(&ids, msg, route).await;
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
        let part = node.push(slice, msg, route).await;
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
/// `route` says whether pushes to ids not held here may be sent on to the other process
/// of a restart (`rpc::forward`).
pub(crate) async fn dispatch(
    node: &Node,
    method: &str,
    param: Value,
    route: Route,
) -> Result<Value, String> {
    let name = method.strip_prefix("Server.").unwrap_or(method);
    let started = std::time::Instant::now();
    let result = dispatch_named(node, name, method, param, route).await;
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
    route: Route,
) -> Result<Value, String> {
    match name {
        "SendToConnections" => match param {
            Value::String(inner) => send_first_generation(node, inner, route).await,
            Value::Object(fields) => send_second_generation(node, Fields(fields), route).await,
            other => Err(format!(
                "SendToConnections takes a JSON string or object, found {}",
                crate::codec::json::kind_of(&other)
            )),
        },
        "KickConnections" => kick(node, &Fields::from(param)?, route).await,
        _ => match Newest::named(name) {
            Some(newest) => Ok(enveloped(match Fields::from(param) {
                Ok(fields) => newest.answer(node, &fields, route).await,
                // These answer in the envelope whatever went wrong: 40000, not a bare error.
                Err(why) => Err(Failure::new(code::BAD_PARAMS, why)),
            })),
            None => Err(format!("rpc: can't find method {method}")),
        },
    }
}

/// The newest generation's methods (and Comet's own), answered in the
/// `{code, data, error}` envelope.
#[derive(Debug, Clone, Copy)]
enum Newest {
    Broadcast,
    CheckConnectionsOnline,
    GetAllConnections,
    GetNode,
    JoinGroup,
    LeaveGroup,
    SendToGroup,
    Status,
}

impl Newest {
    fn named(name: &str) -> Option<Newest> {
        Some(match name {
            "Broadcast" => Newest::Broadcast,
            "CheckConnectionsOnline" => Newest::CheckConnectionsOnline,
            "GetAllConnections" => Newest::GetAllConnections,
            "GetNode" => Newest::GetNode,
            "JoinGroup" => Newest::JoinGroup,
            "LeaveGroup" => Newest::LeaveGroup,
            "SendToGroup" => Newest::SendToGroup,
            "Status" => Newest::Status,
            _ => return None,
        })
    }

    async fn answer(self, node: &Node, fields: &Fields, route: Route) -> Enveloped {
        match self {
            Newest::Broadcast => broadcast(node, fields, route).await,
            Newest::CheckConnectionsOnline => check_online(node, fields),
            Newest::GetAllConnections => {
                authorised(node, fields).map(|()| json!(node.all_connections()))
            }
            Newest::GetNode => match authorised(node, fields) {
                Ok(()) => Ok(node.describe().await),
                Err(refused) => Err(refused),
            },
            Newest::JoinGroup => change_group(node, fields, Membership::Join, route).await,
            Newest::LeaveGroup => change_group(node, fields, Membership::Leave, route).await,
            Newest::SendToGroup => send_to_group(node, fields, route).await,
            Newest::Status => match authorised(node, fields) {
                Ok(()) => Ok(node.status().await),
                Err(refused) => Err(refused),
            },
        }
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
        Value::String(inner) => match parse_value(inner.as_bytes()) {
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
                crate::codec::json::kind_of(&other)
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
                        crate::codec::json::kind_of(&other)
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "{name} must be an array, found {}",
                crate::codec::json::kind_of(&other)
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
                        crate::codec::json::kind_of(other)
                    )),
                })
                .collect(),
            Some(other) => Err(format!(
                "{name} must be an array, found {}",
                crate::codec::json::kind_of(other)
            )),
        }
    }
}

/// Constant-time comparison against `comet_rpc_token`; any token passes when none is set.
fn token_ok(node: &Node, given: &str) -> bool {
    let expected = node.config.comet_rpc_token.as_bytes();
    expected.is_empty() || bool::from(expected.ct_eq(given.as_bytes()))
}

/// First generation: `P` is a string holding `{"to": [...], "msg": "..."}`.
async fn send_first_generation(node: &Node, inner: String, route: Route) -> Result<Value, String> {
    let failure =
        |ids: &[String], info: &str| Err(json!({"error_ids": ids, "error_info": info}).to_string());
    // A large inner request is parsed off the control thread, like a large request.
    let parsed = if inner.len() < super::PARSE_OFF_THREAD_BYTES {
        parse_value(inner.as_bytes()).ok()
    } else {
        tokio::task::spawn_blocking(move || parse_value(inner.as_bytes()).ok())
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
    let failed = push_in_slices(node, to, &msg, route).await.failed;
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
async fn send_second_generation(
    node: &Node,
    mut fields: Fields,
    route: Route,
) -> Result<Value, String> {
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
    let PushOutcome { failed, buffered } = push_in_slices(node, connections, &msg, route).await;
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

async fn kick(node: &Node, fields: &Fields, route: Route) -> Result<Value, String> {
    if !token_ok(node, &fields.text("token")) {
        return Err(json!({"ids": [], "msg": "token error."}).to_string());
    }
    let connections = fields.ids("connections")?;
    if connections.is_empty() {
        return Err(json!({"ids": [], "msg": "connections is empty."}).to_string());
    }
    node.kick(&connections, route).await;
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

async fn broadcast(node: &Node, fields: &Fields, route: Route) -> Enveloped {
    authorised(node, fields)?;
    let msg = fields.text("msg");
    if msg.is_empty() {
        return Err(Failure::new(code::BAD_PARAMS, "msg is empty."));
    }
    let outcome = node.broadcast(&msg, route).await;
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

async fn change_group(node: &Node, fields: &Fields, change: Membership, route: Route) -> Enveloped {
    authorised(node, fields)?;
    let group = group_name(fields)?;
    let connections = fields
        .ids("connections")
        .map_err(|why| Failure::new(code::BAD_PARAMS, why))?;
    if connections.is_empty() {
        return Err(Failure::new(code::BAD_PARAMS, "connections is empty."));
    }
    let not_found = node.change_group(change, &group, &connections, route).await;
    let data = json!({"group": group, "not_found": not_found});
    partial(data, &not_found, "are not on this node")
}

async fn send_to_group(node: &Node, fields: &Fields, route: Route) -> Enveloped {
    authorised(node, fields)?;
    let group = group_name(fields)?;
    let msg = fields.text("msg");
    if msg.is_empty() {
        return Err(Failure::new(code::BAD_PARAMS, "msg is empty."));
    }
    let outcome = node.group_push(&group, &msg, route).await;
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

#[cfg(test)]
mod tests {
    //! Every method against a real `Node` whose shards are test threads answering the
    //! shard commands from a set of conn_ids they hold: the reply shapes and the rules of
    //! push, broadcast, kick and groups without a socket.

    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::rc::Rc;
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};
    use tokio::sync::oneshot;

    use super::code;
    use crate::callback::CallbackStats;
    use crate::config::{Config, EMBEDDED_DEFAULT};
    use crate::control::{Node, NodeParts, Route};
    use crate::link::{
        self, BroadcastOutcome, DirectoryRequest, Inbox, PushOutcome, ShardCommand, ShardStats,
    };
    use crate::presence::Presence;

    /// A message server's call (not one forwarded from the other process of a restart).
    async fn dispatch(node: &Node, method: &str, param: Value) -> Result<Value, String> {
        super::dispatch(node, method, param, Route::MayForward).await
    }

    /// What the test shards were handed: (shard, conn_id, message).
    type Deliveries = Arc<Mutex<Vec<(usize, String, String)>>>;

    /// A shard thread holding `held`, answering until the node's handles are gone.
    fn fake_shard(id: usize, inbox: Inbox, held: &[&str], seen: Deliveries) {
        let mut held: HashSet<String> = held.iter().map(|s| s.to_string()).collect();
        let mut groups: HashMap<String, HashSet<String>> = HashMap::new();
        std::thread::spawn(move || {
            while let Some(command) = futures_lite::future::block_on(inbox.recv()) {
                let text =
                    |m: &crate::codec::Message| String::from_utf8_lossy(m.payload()).into_owned();
                match command {
                    ShardCommand::Push {
                        message,
                        conn_ids,
                        reply,
                    } => {
                        let (here, away): (Vec<_>, Vec<_>) =
                            conn_ids.into_iter().partition(|c| held.contains(c));
                        for conn_id in here {
                            seen.lock().unwrap().push((id, conn_id, text(&message)));
                        }
                        let _ = reply.send(PushOutcome {
                            failed: away,
                            buffered: Vec::new(),
                        });
                    }
                    ShardCommand::Broadcast { message, reply } => {
                        for conn_id in &held {
                            seen.lock()
                                .unwrap()
                                .push((id, conn_id.clone(), text(&message)));
                        }
                        let _ = reply.send(BroadcastOutcome {
                            delivered: held.len(),
                            failed: Vec::new(),
                        });
                    }
                    ShardCommand::Kick {
                        conn_ids, reply, ..
                    } => {
                        let missing = conn_ids.into_iter().filter(|c| !held.remove(c)).collect();
                        if let Some(reply) = reply {
                            let _ = reply.send(missing);
                        }
                    }
                    ShardCommand::GroupJoin {
                        group,
                        conn_ids,
                        reply,
                    } => {
                        let (here, missing): (Vec<_>, Vec<_>) =
                            conn_ids.into_iter().partition(|c| held.contains(c));
                        groups.entry(group).or_default().extend(here);
                        let _ = reply.send(missing);
                    }
                    ShardCommand::GroupLeave {
                        group,
                        conn_ids,
                        reply,
                    } => {
                        let members = groups.entry(group).or_default();
                        let missing = conn_ids
                            .into_iter()
                            .filter(|c| !members.remove(c))
                            .collect();
                        let _ = reply.send(missing);
                    }
                    ShardCommand::GroupPush {
                        group,
                        message,
                        reply,
                    } => {
                        let members = groups.get(&group).cloned().unwrap_or_default();
                        for conn_id in &members {
                            seen.lock()
                                .unwrap()
                                .push((id, conn_id.clone(), text(&message)));
                        }
                        let _ = reply.send(BroadcastOutcome {
                            delivered: members.len(),
                            failed: Vec::new(),
                        });
                    }
                    ShardCommand::Stats { reply } => {
                        let _ = reply.send(ShardStats {
                            shard: id,
                            connections: held.len(),
                            ..ShardStats::default()
                        });
                    }
                    ShardCommand::Ping { reply } => {
                        let _ = reply.send(());
                    }
                    _ => {}
                }
            }
        });
    }

    /// A node with a shard per entry of `shards` (the conn_ids it holds, claimed through
    /// the directory as a real shard claims them), running `test` on the control thread.
    fn with_node<F, Fut>(extra: &str, shards: &[&[&str]], test: F)
    where
        F: FnOnce(Rc<Node>, Deliveries) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (config, _) = Config::parse(&format!("{EMBEDDED_DEFAULT}\n{extra}")).unwrap();
        let seen: Deliveries = Arc::default();
        let mut handles = Vec::new();
        for (id, held) in shards.iter().enumerate() {
            let (handle, inbox) = link::shard_channel();
            fake_shard(id, inbox, held, Arc::clone(&seen));
            handles.push(handle);
        }
        let (presence, _workers) = Presence::start(None, 1, 0, 1 << 20, None);
        let node = Node::new(NodeParts {
            config: Arc::new(config),
            shards: handles,
            refuse_new_clients: Arc::default(),
            callback_stats: Arc::new(CallbackStats::default()),
            inherited_lease: None,
            presence,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async move {
            let (link, requests) = link::directory_channel();
            tokio::task::spawn_local(Rc::clone(&node).serve_directory(requests));
            for (shard, held) in shards.iter().enumerate() {
                for conn_id in *held {
                    let (reply, granted) = oneshot::channel();
                    link.send(DirectoryRequest::Claim {
                        conn_id: conn_id.to_string(),
                        shard,
                        reply,
                    });
                    assert!(granted.await.unwrap(), "{conn_id} claimed");
                }
            }
            test(node, seen).await;
        });
    }

    fn delivered(seen: &Deliveries) -> BTreeMap<String, String> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|(_, id, msg)| (id.clone(), msg.clone()))
            .collect()
    }

    fn error_object(answer: Result<Value, String>) -> Value {
        serde_json::from_str(&answer.expect_err("a failure")).unwrap()
    }

    #[test]
    fn second_generation_push_reaches_holders_on_every_shard_and_names_the_rest() {
        with_node("", &[&["a", "b"], &["c"]], |node, seen| async move {
            let all = json!({"connections": ["a", "c"], "msg": "hi"});
            assert_eq!(
                dispatch(&node, "Server.SendToConnections", all).await,
                Ok(json!("ok"))
            );
            let some = json!({"Connections": ["b", "zz", "b"], "MSG": "again"});
            let failure = error_object(dispatch(&node, "Server.SendToConnections", some).await);
            assert_eq!(
                failure,
                json!({"ids": ["zz"], "msg": "some connections could not be reached."})
            );
            let got = delivered(&seen);
            assert_eq!(got["a"], "hi");
            assert_eq!(got["c"], "hi");
            assert_eq!(got["b"], "again");
            assert_eq!(
                seen.lock().unwrap().len(),
                3,
                "b named twice, delivered once"
            );
            let empty = json!({"connections": [], "msg": "x"});
            let failure = error_object(dispatch(&node, "SendToConnections", empty).await);
            assert_eq!(failure["msg"], "connections is empty.");
        });
    }

    #[test]
    fn first_generation_push_takes_a_json_string() {
        with_node("", &[&["a"]], |node, seen| async move {
            let param = json!(json!({"to": ["a", "x"], "msg": "one"}).to_string());
            let failure = error_object(dispatch(&node, "Server.SendToConnections", param).await);
            assert_eq!(
                failure,
                json!({"error_ids": ["x"], "error_info": "some connections could not be reached"})
            );
            assert_eq!(delivered(&seen)["a"], "one");
            let not_json = dispatch(&node, "Server.SendToConnections", json!("{nope")).await;
            assert_eq!(
                error_object(not_json)["error_info"],
                "param is not a JSON object string"
            );
            let wrong = dispatch(&node, "Server.SendToConnections", json!(42)).await;
            assert!(wrong.unwrap_err().contains("takes a JSON string or object"));
        });
    }

    #[test]
    fn a_wrong_token_is_refused_by_every_method_before_anything_is_done() {
        with_node(
            "comet_rpc_token=sesame",
            &[&["a"]],
            |node, seen| async move {
                let push = json!({"connections": ["a"], "msg": "m", "token": "guess"});
                assert_eq!(
                    error_object(dispatch(&node, "SendToConnections", push).await)["msg"],
                    "token error."
                );
                let gen1 = json!(json!({"to": ["a"], "msg": "m", "token": "guess"}).to_string());
                assert_eq!(
                    error_object(dispatch(&node, "SendToConnections", gen1).await)["error_info"],
                    "token error."
                );
                for method in [
                    "Broadcast",
                    "GetAllConnections",
                    "CheckConnectionsOnline",
                    "Status",
                    "GetNode",
                ] {
                    let answer = dispatch(&node, method, json!({"token": "guess", "msg": "m"}))
                        .await
                        .unwrap();
                    assert_eq!(answer["error"], "token error.", "{method}");
                    assert_eq!(answer["code"], code::BAD_TOKEN, "{method}");
                }
                assert!(seen.lock().unwrap().is_empty(), "nothing was delivered");
                let right = json!({"connections": ["a"], "msg": "m", "token": "sesame"});
                assert_eq!(
                    dispatch(&node, "SendToConnections", right).await,
                    Ok(json!("ok"))
                );
            },
        );
    }

    #[test]
    fn broadcast_and_groups_answer_with_codes_and_counts() {
        with_node("", &[&["a", "b"], &["c"]], |node, seen| async move {
            let answer = dispatch(&node, "Broadcast", json!({"msg": "all"}))
                .await
                .unwrap();
            assert_eq!(
                answer,
                json!({"code": code::OK, "data": {"delivered": 3, "failed": []}, "error": ""})
            );
            let join = json!({"group": "g", "connections": ["a", "c", "gone"]});
            let answer = dispatch(&node, "JoinGroup", join).await.unwrap();
            assert_eq!(answer["data"], json!({"group": "g", "not_found": ["gone"]}));
            assert_eq!(answer["code"], code::SOME_FAILED, "a partial join");
            let answer = dispatch(&node, "SendToGroup", json!({"group": "g", "msg": "grp"}))
                .await
                .unwrap();
            assert_eq!(answer["data"]["delivered"], 2);
            let seen_group: Vec<_> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, _, m)| m == "grp")
                .map(|(_, id, _)| id.clone())
                .collect();
            assert_eq!(seen_group.len(), 2);
            let answer = dispatch(&node, "SendToGroup", json!({"msg": "x"}))
                .await
                .unwrap();
            assert_eq!(answer["error"], "group is empty.");
            assert_eq!(answer["code"], code::BAD_PARAMS);
            let answer = dispatch(&node, "Broadcast", json!({})).await.unwrap();
            assert_eq!(answer["error"], "msg is empty.");
        });
    }

    #[test]
    fn kick_online_checks_and_unknown_methods() {
        with_node("", &[&["a"], &["b"]], |node, _| async move {
            let online = dispatch(
                &node,
                "CheckConnectionsOnline",
                json!({"connections": ["a", "b", "x"]}),
            )
            .await
            .unwrap();
            assert_eq!(online["code"], code::OK);
            assert_eq!(
                online["data"],
                json!(["a", "b"]),
                "the ones online, in the order asked"
            );
            let mut all: Vec<String> = serde_json::from_value(
                dispatch(&node, "GetAllConnections", json!({}))
                    .await
                    .unwrap()["data"]
                    .clone(),
            )
            .unwrap();
            all.sort();
            assert_eq!(all, ["a", "b"]);
            assert_eq!(
                dispatch(&node, "KickConnections", json!({"connections": ["a"]})).await,
                Ok(json!("ok"))
            );
            let failure =
                error_object(dispatch(&node, "KickConnections", json!({"connections": []})).await);
            assert_eq!(failure["msg"], "connections is empty.");
            let unknown = dispatch(&node, "Server.Nope", json!({})).await.unwrap_err();
            assert_eq!(unknown, "rpc: can't find method Server.Nope");
            let unknown = dispatch(&node, "Nope", json!("x")).await.unwrap_err();
            assert_eq!(unknown, "rpc: can't find method Nope");
        });
    }

    #[test]
    fn newest_generation_methods_answer_bad_params_in_the_envelope() {
        with_node("", &[&["a"]], |node, seen| async move {
            for method in [
                "Broadcast",
                "CheckConnectionsOnline",
                "GetAllConnections",
                "GetNode",
                "JoinGroup",
                "LeaveGroup",
                "SendToGroup",
                "Status",
            ] {
                let answer = dispatch(&node, method, json!(["not", "an", "object"]))
                    .await
                    .unwrap();
                assert_eq!(answer["code"], code::BAD_PARAMS, "{method}: {answer}");
                assert_eq!(
                    answer["error"], "params must be an object, found an array",
                    "{method}"
                );
            }
            assert!(seen.lock().unwrap().is_empty(), "nothing was done");
        });
    }
}
