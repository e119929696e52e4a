//! RESP over TCP: stock Redis clients as Comet clients.
//!
//! A connection goes through three states (docs/PROTOCOL.md §2.2 has the table):
//! - **connected**: it must authenticate (`AUTH`, or `HELLO .. AUTH`) within
//!   `handshake_timeout`. Authenticating verifies the token (`checkToken` or the
//!   signature) but claims nothing: a pooled connection may never subscribe.
//! - **authenticated**: it answers what libraries send on connect (`INFO`, `CLIENT ..`,
//!   `SELECT 0`, `PING`, ...) and is closed after `resp_idle_timeout` without a command.
//! - **subscribed**: `SUBSCRIBE` (or `PSUBSCRIBE`) claims the conn_id and registers the
//!   session, online from there; every push arrives as a pub/sub message on the first
//!   channel it named. Leaving the last channel (or `RESET`) ends that session with its
//!   `offline`, and the connection is authenticated again (connected, after `RESET`):
//!   it may `SUBSCRIBE` again, which is a new session with a new `online`.
//!
//! RESP has no ping a client must answer, so dead subscribed peers are found by TCP
//! keepalive (set on every raw TCP socket, see [`super::enable_keepalive`]) instead of
//! the heartbeat timeout.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ahash::AHashMap;

use crate::codec::Wire;
use crate::codec::frame::close_code;
use crate::codec::resp::{self, Command, CommandDecoder, MAX_CHANNEL_BYTES, MAX_CHANNELS};
use crate::session::{CloseReason, Session};
use crate::shard::Shard;
use crate::token::{ClientToken, token_from_json};
use crate::transport::admission::{self, Refusal};
use crate::transport::{ClientStream, Inbound, answer, close, run_session, write_reply};

/// Client ids for `HELLO` and `CLIENT ID` answers, unique in the process.
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Connections one conn_id may hold past `AUTH` at once, on one shard (subscribed or
/// not). An authenticated connection that never subscribes is no session: nothing else
/// bounds it, and one credential opened 19,937 of them (9.7 KB and a descriptor each,
/// invisible to `comet_connections`) until new clients could not connect. A subscriber
/// and a few pooled connections fit.
pub(crate) const MAX_AUTHENTICATED_PER_CONN_ID: usize = 4;

/// The connections past `AUTH` on one shard, by conn_id.
#[derive(Debug, Default)]
pub(crate) struct Authenticated {
    by_conn_id: RefCell<AHashMap<String, usize>>,
    total: Cell<usize>,
}

impl Authenticated {
    /// Connections past `AUTH` here now (the `comet_resp_authenticated_connections` gauge).
    pub(crate) fn total(&self) -> usize {
        self.total.get()
    }

    fn has_room(&self, conn_id: &str) -> bool {
        self.by_conn_id.borrow().get(conn_id).copied().unwrap_or(0) < MAX_AUTHENTICATED_PER_CONN_ID
    }

    fn take(self: &Rc<Self>, conn_id: &str) -> AuthPlace {
        *self
            .by_conn_id
            .borrow_mut()
            .entry(conn_id.to_owned())
            .or_default() += 1;
        self.total.set(self.total.get() + 1);
        AuthPlace {
            counts: Rc::clone(self),
            conn_id: conn_id.to_owned(),
        }
    }
}

/// One authenticated connection's place in [`Authenticated`], given back when the
/// connection ends, resets or authenticates as another conn_id.
#[derive(Debug)]
struct AuthPlace {
    counts: Rc<Authenticated>,
    conn_id: String,
}

impl Drop for AuthPlace {
    fn drop(&mut self) {
        let mut by_conn_id = self.counts.by_conn_id.borrow_mut();
        if let Some(count) = by_conn_id.get_mut(&self.conn_id) {
            *count -= 1;
            if *count == 0 {
                by_conn_id.remove(&self.conn_id);
            }
        }
        self.counts.total.set(self.counts.total.get() - 1);
    }
}

/// Serves a RESP client; `first` holds bytes already read from it.
pub(crate) async fn serve<S: ClientStream>(
    shard: &Rc<Shard>,
    mut stream: S,
    direct_fd: Option<RawFd>,
    first: Vec<u8>,
) {
    let mut conn = Conn::new(&first);
    loop {
        let Some((session, mut subscriber)) =
            Box::pin(greet(shard, &mut stream, direct_fd, conn)).await
        else {
            return;
        };
        let mut replies = Vec::new();
        let drained = subscriber.drain(&mut replies);
        answer(&session, &mut replies);
        let reason = match drained {
            Some(reason) => reason,
            None => run_session(shard, &mut stream, &session, &mut subscriber).await,
        };
        // A kick, replacement or shutdown that came meanwhile wins over the client's own
        // leaving: the connection closes then.
        match (subscriber.left.take(), session.close_reason()) {
            (Some(leave), None) => {
                shard.unregister(&session, &reason);
                if !flush_rest(shard, &mut stream, &session).await {
                    return;
                }
                conn = subscriber.conn;
                if leave == Leave::Reset {
                    conn.reset();
                }
            }
            (_, requested) => {
                let reason = requested.unwrap_or(reason);
                shard.unregister(&session, &reason);
                Box::pin(close(shard, &mut stream, &session, reason)).await;
                return;
            }
        }
    }
}

/// Writes what an ended session still had queued (the confirmations of the
/// `UNSUBSCRIBE` that ended it, messages before them) before the connection answers
/// anything else; false if the client is gone.
async fn flush_rest<S: ClientStream>(shard: &Shard, stream: &mut S, session: &Session) -> bool {
    let rest = session.take_unwritten();
    rest.is_empty() || write_reply(stream, &rest, shard.config.handshake_timeout).await
}

/// What a connection keeps across its sessions.
struct Conn {
    decoder: CommandDecoder,
    resp3: bool,
    /// `CLIENT SETNAME` / `HELLO .. SETNAME`: the `info` of the next session.
    name: Option<String>,
    client_id: u64,
    /// The verified token, once `AUTH` passed; each `SUBSCRIBE` claims its conn_id.
    credentials: Option<ClientToken>,
    /// Since when the connection has been unauthenticated (it has `handshake_timeout`).
    unauthenticated_since: Instant,
    /// Its place among its conn_id's authenticated connections (with `credentials`).
    place: Option<AuthPlace>,
    /// Tokens refused on this connection so far (not reset by `RESET`).
    refused_tokens: u32,
}

/// Refused tokens after which a connection is closed: a library authenticates once per
/// connection, and without a bound one connection could try tokens for as long as it
/// kept sending (each a signature check on the shard, or a `checkToken` call).
const MAX_REFUSED_TOKENS: u32 = 3;

/// What a command before push mode leads to: what the driver must do next. Deciding it
/// is synchronous, so every rule of the greeting is unit-tested without a socket or a
/// shard; the driver does the waiting (verification, claims, writes).
#[derive(Debug)]
enum Step {
    Reply(Vec<u8>),
    /// Count a refused handshake under `reason`, then send `reply`.
    Refuse {
        reason: &'static str,
        reply: Vec<u8>,
    },
    /// Verify `token` (`admission::verify`), then hand the outcome to
    /// [`Conn::verified`].
    Verify {
        token: ClientToken,
        then: AfterVerify,
    },
    Subscribe {
        channels: Vec<Vec<u8>>,
        pattern: bool,
    },
    Quit,
}

/// Which command a verification answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterVerify {
    /// `AUTH`: `+OK`.
    Auth,
    /// `HELLO protocol AUTH ..`: the HELLO reply, in that protocol.
    Hello { protocol: u8 },
}

/// How a session ended that leaves the connection open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// The last channel was left: authenticated again.
    Unsubscribed,
    /// `RESET`: connected again, as Redis resets a connection.
    Reset,
}

/// Runs commands until the client subscribes (returning the registered session) or the
/// connection ends.
async fn greet<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    direct_fd: Option<RawFd>,
    mut conn: Conn,
) -> Option<(Rc<Session>, Subscriber)> {
    let mut chunk = [0u8; 1024];
    loop {
        match conn.decoder.next_command() {
            Ok(Some(command)) => {
                let reply = match conn.step(command) {
                    Step::Reply(reply) => reply,
                    Step::Refuse { reason, reply } => {
                        shard.handshake_refused(reason);
                        reply
                    }
                    Step::Verify { token, then } => {
                        let held = conn
                            .place
                            .as_ref()
                            .is_some_and(|place| place.conn_id == token.conn_id);
                        if !held && !shard.resp_authenticated.has_room(&token.conn_id) {
                            shard.handshake_refused("conn_id_limit");
                            tracing::info!(shard = shard.id, conn_id = ?token.conn_id, limit = MAX_AUTHENTICATED_PER_CONN_ID, "RESP client refused: its conn_id holds as many authenticated connections as it may");
                            resp::error(&format!(
                                "ERR this conn_id already holds {MAX_AUTHENTICATED_PER_CONN_ID} authenticated connections here"
                            ))
                        } else {
                            let outcome = admission::verify(shard, token).await;
                            match &outcome {
                                Err(refusal) => {
                                    shard.handshake_refused(refusal.label());
                                    tracing::info!(shard = shard.id, reason = %refusal, "RESP client refused");
                                }
                                Ok(token) if !held => {
                                    conn.place =
                                        Some(shard.resp_authenticated.take(&token.conn_id));
                                }
                                Ok(_) => {}
                            }
                            conn.verified(outcome, then)
                        }
                    }
                    Step::Quit => {
                        let _ =
                            write_reply(stream, &resp::simple("OK"), shard.config.close_timeout)
                                .await;
                        return None;
                    }
                    Step::Subscribe { channels, pattern } => {
                        match subscribe(shard, stream, direct_fd, conn, channels, pattern).await {
                            Subscribed::Online(session, subscriber) => {
                                return Some((session, subscriber));
                            }
                            Subscribed::Refused(back, reply) => {
                                conn = back;
                                reply
                            }
                            Subscribed::Gone => return None,
                        }
                    }
                };
                if !write_reply(stream, &reply, shard.config.handshake_timeout).await {
                    return None;
                }
                if conn.out_of_attempts() {
                    tracing::info!(
                        shard = shard.id,
                        refused = conn.refused_tokens,
                        "RESP client closed: too many refused tokens on one connection"
                    );
                    return None;
                }
            }
            Ok(None) => {
                // Unauthenticated clients get the handshake timeout in all; authenticated
                // ones `resp_idle_timeout` between commands.
                let limit = match conn.credentials {
                    None => shard
                        .config
                        .handshake_timeout
                        .saturating_sub(conn.unauthenticated_since.elapsed()),
                    Some(_) => shard.config.resp_idle_timeout,
                };
                match super::read_within(stream, &mut chunk, limit).await {
                    Some(n) if n > 0 => conn.decoder.feed(&chunk[..n]),
                    Some(_) => {
                        if conn.credentials.is_none() {
                            shard.handshake_refused("gone");
                        }
                        return None;
                    }
                    None => {
                        // Closed without a reply, as Redis's own `timeout` does: an
                        // unsolicited reply would be taken for the answer to the
                        // client's next command.
                        match &conn.credentials {
                            None => {
                                shard.handshake_refused("timeout");
                                tracing::info!(
                                    shard = shard.id,
                                    "RESP client did not authenticate in time"
                                );
                            }
                            Some(token) => tracing::info!(
                                shard = shard.id,
                                conn_id = ?token.conn_id,
                                idle = ?limit,
                                "RESP client idle without SUBSCRIBE past resp_idle_timeout"
                            ),
                        }
                        return None;
                    }
                }
            }
            Err(err) => {
                if conn.credentials.is_none() {
                    shard.handshake_refused("bad_request");
                }
                tracing::info!(shard = shard.id, error = %err, "RESP client sent a malformed command");
                let reply = resp::error(&format!("ERR Protocol error: {err}"));
                let _ = write_reply(stream, &reply, shard.config.close_timeout).await;
                return None;
            }
        }
    }
}

/// The outcome of a `SUBSCRIBE` before push mode.
enum Subscribed {
    Online(Rc<Session>, Subscriber),
    /// Not subscribed (over the channel cap, conn_id taken, node overloaded): the reply
    /// says why and the connection goes on as it was.
    Refused(Conn, Vec<u8>),
    Gone,
}

/// Claims the conn_id, confirms the subscriptions, then registers the session:
/// confirmations go out before any push can.
async fn subscribe<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    direct_fd: Option<RawFd>,
    conn: Conn,
    channels: Vec<Vec<u8>>,
    pattern: bool,
) -> Subscribed {
    let Some(token) = conn.credentials.clone() else {
        return Subscribed::Refused(
            conn,
            resp::error("NOAUTH Authentication required: AUTH <conn_id> <token> first"),
        );
    };
    let mut subscriber = Subscriber::new(conn);
    let confirmations = match subscriber.add(&channels, pattern) {
        Ok(confirmations) => confirmations,
        Err(refused) => return Subscribed::Refused(subscriber.conn, refused),
    };
    let mut token = token;
    if let Some(name) = &subscriber.conn.name {
        token.info.clone_from(name);
    }
    let admitted = match admission::claim_verified(shard, token).await {
        Ok(admitted) => admitted,
        Err(refusal) => {
            shard.handshake_refused(refusal.label());
            tracing::info!(shard = shard.id, reason = %refusal, "RESP client refused");
            return Subscribed::Refused(subscriber.conn, resp::error(&refusal_text(&refusal)));
        }
    };
    if !write_reply(stream, &confirmations, shard.config.handshake_timeout).await {
        return Subscribed::Gone;
    }
    let head = resp::message_prefix(&channels[0], pattern, subscriber.conn.resp3);
    let session = admitted.register(Wire::Resp, head.into_boxed_slice(), direct_fd);
    Subscribed::Online(session, subscriber)
}

fn upper(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_uppercase()
}

fn text(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

fn wrong_arity(name: &str) -> Vec<u8> {
    resp::error(&format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    ))
}

fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Token => format!("WRONGPASS {refusal}"),
        Refusal::Duplicate | Refusal::ClientClosed => format!("ERR {refusal}"),
        Refusal::MessageServer
        | Refusal::Saturated
        | Refusal::ClaimTimedOut
        | Refusal::PresenceBacklog => {
            let retry = refusal.retry_after().unwrap_or(1);
            format!("TRYAGAIN {refusal} (retry after {retry} s)")
        }
    }
}

/// What `AUTH` / `HELLO .. AUTH` credentials name. `<user> <password>` is conn_id and
/// token; a password that is a whole token object (`{"conn_id":..,"token":..}`) is the
/// token object, alone or with the user `default` or an empty one: Redis means the same
/// by `AUTH pw` and `AUTH default pw`, and RESP3 libraries only send the second (`HELLO 3
/// AUTH default pw`). `name` (the client's `SETNAME`) is the `info` of a token that does
/// not carry one.
fn credentials(
    user: Option<&[u8]>,
    password: &[u8],
    name: Option<&str>,
) -> Result<ClientToken, &'static str> {
    let token_object =
        matches!(user, None | Some(b"") | Some(b"default")) && password.first() == Some(&b'{');
    if token_object {
        let mut token = token_from_json(password).map_err(|_| {
            "WRONGPASS the password is not a token object {\"conn_id\":..,\"token\":..,\"info\":..}"
        })?;
        if token.info.is_empty()
            && let Some(name) = name
        {
            token.info = name.to_owned();
        }
        return Ok(token);
    }
    let Some(user) = user else {
        return Err(
            "ERR AUTH needs <conn_id> <token>, or one token object {\"conn_id\":..,\"token\":..,\"info\":..}",
        );
    };
    if user.is_empty() || user.len() > 256 {
        return Err("WRONGPASS conn_id must be 1 to 256 bytes");
    }
    Ok(ClientToken {
        conn_id: text(user),
        token: text(password),
        info: name.unwrap_or_default().to_owned(),
        // RESP clients do not recover (docs/PROTOCOL.md, "Recovery").
        recovery: Default::default(),
    })
}

impl Conn {
    fn new(first: &[u8]) -> Conn {
        let mut decoder = CommandDecoder::default();
        decoder.feed(first);
        Conn {
            decoder,
            resp3: false,
            name: None,
            client_id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            credentials: None,
            unauthenticated_since: Instant::now(),
            place: None,
            refused_tokens: 0,
        }
    }

    /// Whether the connection has had all the tries at a token it gets.
    fn out_of_attempts(&self) -> bool {
        self.refused_tokens >= MAX_REFUSED_TOKENS
    }

    /// `RESET`: back to a fresh connection (RESP2, no name, not authenticated).
    fn reset(&mut self) {
        self.resp3 = false;
        self.name = None;
        // The handshake timeout starts again only for a connection that had
        // authenticated: otherwise a RESET every few seconds kept one open for good
        // without a token.
        if self.credentials.take().is_some() {
            self.unauthenticated_since = Instant::now();
        }
        self.place = None;
    }

    /// One command before push mode.
    fn step(&mut self, command: Command) -> Step {
        let name = upper(&command[0]);
        let args = &command[1..];
        if let Some(reply) = self.common(&name, args, false) {
            return Step::Reply(reply);
        }
        match name.as_str() {
            "PING" => Step::Reply(match args {
                [] | [_] => resp::pong(args.first().map(Vec::as_slice), false, self.resp3),
                _ => wrong_arity(&name),
            }),
            "QUIT" => Step::Quit,
            "RESET" => {
                self.reset();
                Step::Reply(resp::simple("RESET"))
            }
            "AUTH" => match args {
                [user, password] => self.authenticate(Some(user), password, AfterVerify::Auth),
                [password] => self.authenticate(None, password, AfterVerify::Auth),
                _ => Step::Reply(wrong_arity(&name)),
            },
            "HELLO" => self.hello(args),
            "SUBSCRIBE" | "PSUBSCRIBE" if args.is_empty() => Step::Reply(wrong_arity(&name)),
            "SUBSCRIBE" | "PSUBSCRIBE" => Step::Subscribe {
                channels: args.to_vec(),
                pattern: name == "PSUBSCRIBE",
            },
            // Not subscribed: what Redis answers (libraries send it when resetting a
            // pub/sub connection).
            "UNSUBSCRIBE" | "PUNSUBSCRIBE" => {
                Step::Reply(nothing_to_leave(&name.to_ascii_lowercase(), self.resp3))
            }
            _ => {
                // What a library sends that Comet does not know is what to add next.
                tracing::debug!(command = %text(&command[0]), "unknown RESP command");
                Step::Reply(resp::error(&format!(
                    "ERR unknown command '{}': Comet accepts HELLO, AUTH, CLIENT, INFO, SELECT, PING, ECHO, RESET, QUIT, SUBSCRIBE, PSUBSCRIBE, UNSUBSCRIBE, PUNSUBSCRIBE",
                    text(&command[0])
                )))
            }
        }
    }

    /// Commands answered alike before push mode and in it (where RESP2 allows them);
    /// `None` if `name` is not one of them.
    fn common(&mut self, name: &str, args: &[Vec<u8>], subscribed: bool) -> Option<Vec<u8>> {
        Some(match name {
            "ECHO" => match args {
                [message] => resp::bulk(message),
                _ => wrong_arity(name),
            },
            "SELECT" => match args {
                [db] if db.as_slice() == b"0" => resp::simple("OK"),
                [_] => resp::error("ERR DB index is out of range (Comet has only db 0)"),
                _ => wrong_arity(name),
            },
            "CLIENT" => self.client(args, subscribed),
            "INFO" => resp::info(args, env!("CARGO_PKG_VERSION")),
            // Cluster clients send these to replicas; Comet is one node that only reads.
            "READONLY" | "READWRITE" if args.is_empty() => resp::simple("OK"),
            "SSUBSCRIBE" | "SUNSUBSCRIBE" => no_shard_channels(name),
            "HELLO" if subscribed => self.hello_subscribed(args),
            "AUTH" if subscribed => resp::error(
                "ERR AUTH is not allowed while subscribed: UNSUBSCRIBE from every channel first",
            ),
            _ => return None,
        })
    }

    fn client(&mut self, args: &[Vec<u8>], subscribed: bool) -> Vec<u8> {
        let Some(sub) = args.first() else {
            return wrong_arity("client");
        };
        let sub = upper(sub);
        let arity = || wrong_arity(&format!("client|{sub}"));
        match (sub.as_str(), &args[1..]) {
            ("SETNAME", [name]) => {
                let name = text(name);
                // The info of a session is fixed when it goes online: a name set while
                // subscribed is for the next session.
                if !subscribed && let Some(token) = &mut self.credentials {
                    token.info.clone_from(&name);
                }
                self.name = Some(name);
                resp::simple("OK")
            }
            ("SETINFO", [attribute, value]) => {
                let attribute = upper(attribute);
                if attribute != "LIB-NAME" && attribute != "LIB-VER" {
                    return resp::error(&format!("ERR Unrecognized option '{}'", text(&args[1])));
                }
                // As Redis: printable ASCII without spaces.
                if value.iter().any(|b| !(b'!'..=b'~').contains(b)) {
                    return resp::error(&format!(
                        "ERR {} cannot contain spaces, newlines or special characters.",
                        attribute.to_ascii_lowercase()
                    ));
                }
                resp::simple("OK")
            }
            ("GETNAME", []) => match &self.name {
                Some(name) => resp::bulk(name.as_bytes()),
                None => resp::null(self.resp3),
            },
            ("ID", []) => resp::integer(self.client_id as i64),
            // node-redis asks for maintenance push notifications; Comet never moves a
            // connection, so there are none to send, and either answer is true.
            ("MAINT_NOTIFICATIONS", [state, ..])
                if matches!(upper(state).as_str(), "ON" | "OFF") =>
            {
                resp::simple("OK")
            }
            ("SETNAME" | "SETINFO" | "GETNAME" | "ID" | "MAINT_NOTIFICATIONS", _) => arity(),
            _ => resp::error(&format!(
                "ERR unknown subcommand '{}'. Comet accepts CLIENT SETNAME, SETINFO, GETNAME, ID, MAINT_NOTIFICATIONS",
                text(&args[0])
            )),
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]` before push mode. With `AUTH`,
    /// the protocol switches only once the credentials are verified.
    fn hello(&mut self, args: &[Vec<u8>]) -> Step {
        let (protocol, auth, name) = match parse_hello(args, self.resp3) {
            Ok(parsed) => parsed,
            Err(refused) => return Step::Reply(refused),
        };
        if let Some(name) = name {
            self.name = Some(name);
        }
        if let Some((user, password)) = auth {
            return self.authenticate(Some(&user), &password, AfterVerify::Hello { protocol });
        }
        self.resp3 = protocol == 3;
        Step::Reply(resp::hello(protocol, self.client_id))
    }

    /// `HELLO` in push mode: the facts again, but neither new credentials nor another
    /// protocol (every message of the session is framed for the one it started with).
    fn hello_subscribed(&mut self, args: &[Vec<u8>]) -> Vec<u8> {
        match parse_hello(args, self.resp3) {
            Err(refused) => refused,
            Ok((_, Some(_), _)) => resp::error(
                "ERR HELLO AUTH is not allowed while subscribed: UNSUBSCRIBE from every channel first",
            ),
            Ok((protocol, None, _)) if (protocol == 3) != self.resp3 => resp::error(
                "ERR cannot switch protocol while subscribed: UNSUBSCRIBE from every channel first",
            ),
            Ok((protocol, None, name)) => {
                if name.is_some() {
                    self.name = name;
                }
                resp::hello(protocol, self.client_id)
            }
        }
    }

    /// Credentials to verify, or why they are not credentials at all.
    fn authenticate(&self, user: Option<&[u8]>, password: &[u8], then: AfterVerify) -> Step {
        match credentials(user, password, self.name.as_deref()) {
            Ok(token) => Step::Verify { token, then },
            Err(why) => Step::Refuse {
                reason: "token",
                reply: resp::error(why),
            },
        }
    }

    /// The reply to the command a verification answers. Verified credentials replace
    /// any earlier ones; refused ones keep them (as in Redis), and the protocol with them.
    fn verified(&mut self, outcome: Result<ClientToken, Refusal>, then: AfterVerify) -> Vec<u8> {
        match outcome {
            Err(refusal) => {
                // Only a wrong token is the client's doing: after an overload or a
                // message server that could not be asked it may rightly try again.
                if matches!(refusal, Refusal::Token) {
                    self.refused_tokens += 1;
                }
                resp::error(&refusal_text(&refusal))
            }
            Ok(token) => {
                self.credentials = Some(token);
                match then {
                    AfterVerify::Auth => resp::simple("OK"),
                    AfterVerify::Hello { protocol } => {
                        self.resp3 = protocol == 3;
                        resp::hello(protocol, self.client_id)
                    }
                }
            }
        }
    }
}

/// The parts of `HELLO [protover [AUTH user pass] [SETNAME name]]`: the protocol, the
/// credentials and the name, or the error reply.
#[allow(clippy::type_complexity)]
fn parse_hello(
    args: &[Vec<u8>],
    resp3: bool,
) -> Result<(u8, Option<(Vec<u8>, Vec<u8>)>, Option<String>), Vec<u8>> {
    let mut protocol = if resp3 { 3 } else { 2 };
    let mut rest = args;
    if let [version, tail @ ..] = rest {
        protocol = match version.as_slice() {
            b"2" => 2,
            b"3" => 3,
            _ => {
                return Err(resp::error(
                    "NOPROTO unsupported protocol version (Comet speaks 2 and 3)",
                ));
            }
        };
        rest = tail;
    }
    let mut auth = None;
    let mut name = None;
    while let [option, tail @ ..] = rest {
        match (upper(option).as_str(), tail) {
            ("AUTH", [user, password, more @ ..]) => {
                auth = Some((user.clone(), password.clone()));
                rest = more;
            }
            ("SETNAME", [value, more @ ..]) => {
                name = Some(text(value));
                rest = more;
            }
            _ => {
                return Err(resp::error(&format!(
                    "ERR syntax error in HELLO option '{}'",
                    text(option)
                )));
            }
        }
    }
    Ok((protocol, auth, name))
}

/// The answer to `SSUBSCRIBE` / `SUNSUBSCRIBE`, in every state.
fn no_shard_channels(name: &str) -> Vec<u8> {
    resp::error(&format!(
        "ERR {} is not supported: Comet has no shard channels; use SUBSCRIBE (pushes arrive on the first channel named)",
        name.to_ascii_lowercase()
    ))
}

/// The answer to `(P)UNSUBSCRIBE` with nothing subscribed: `[kind, nil, 0]`.
fn nothing_to_leave(kind: &str, resp3: bool) -> Vec<u8> {
    let mut out = resp::aggregate(3, resp3);
    out.extend(resp::bulk(kind.as_bytes()));
    out.extend(resp::null(resp3));
    out.extend(resp::integer(0));
    out
}

/// A connection in push mode: its subscriptions, and what it may still ask.
struct Subscriber {
    conn: Conn,
    // Sets, not lists: a connection adding its thousandth channel must not compare it
    // with the 999 before (a SUBSCRIBE flood kept a shard busy for seconds).
    // Each name maps to when it was added, so that leaving them all confirms them in the
    // order they were joined (what a person at `nc` expects; Redis's order is its hash
    // table's).
    channels: HashMap<Vec<u8>, u64>,
    patterns: HashMap<Vec<u8>, u64>,
    /// The bytes of every name in `channels` and `patterns`.
    name_bytes: usize,
    joined: u64,
    /// Set when the client's command ended the session but not the connection.
    left: Option<Leave>,
}

impl Subscriber {
    fn new(conn: Conn) -> Subscriber {
        Subscriber {
            conn,
            channels: HashMap::new(),
            patterns: HashMap::new(),
            name_bytes: 0,
            joined: 0,
            left: None,
        }
    }

    fn count(&self) -> usize {
        self.channels.len() + self.patterns.len()
    }

    /// Adds subscriptions and returns their confirmations, or refuses them all (the
    /// error reply) when they would take the connection past [`MAX_CHANNELS`] or
    /// [`MAX_CHANNEL_BYTES`].
    fn add(&mut self, channels: &[Vec<u8>], pattern: bool) -> Result<Vec<u8>, Vec<u8>> {
        let set = if pattern {
            &self.patterns
        } else {
            &self.channels
        };
        let new: HashSet<&[u8]> = channels
            .iter()
            .map(Vec::as_slice)
            .filter(|c| !set.contains_key(*c))
            .collect();
        if self.count() + new.len() > MAX_CHANNELS {
            return Err(resp::error(&format!(
                "ERR too many channels: a connection may subscribe to at most {MAX_CHANNELS} channels and patterns (it has {}, this command adds {})",
                self.count(),
                new.len()
            )));
        }
        let new_bytes: usize = new.iter().map(|name| name.len()).sum();
        if self.name_bytes + new_bytes > MAX_CHANNEL_BYTES {
            return Err(resp::error(&format!(
                "ERR too many channels: a connection's channel and pattern names may take at most {MAX_CHANNEL_BYTES} bytes (it has {}, this command adds {new_bytes})",
                self.name_bytes
            )));
        }
        let kind = if pattern { "psubscribe" } else { "subscribe" };
        let mut out = Vec::new();
        for channel in channels {
            let set = if pattern {
                &mut self.patterns
            } else {
                &mut self.channels
            };
            if !set.contains_key(channel) {
                set.insert(channel.clone(), self.joined);
                self.joined += 1;
                self.name_bytes += channel.len();
            }
            out.extend(resp::subscription(
                kind,
                channel,
                self.count(),
                self.conn.resp3,
            ));
        }
        Ok(out)
    }

    /// Drops subscriptions (all of one kind when `channels` is empty); returns the
    /// confirmations.
    fn remove(&mut self, channels: &[Vec<u8>], pattern: bool) -> Vec<u8> {
        let kind = if pattern {
            "punsubscribe"
        } else {
            "unsubscribe"
        };
        let targets: Vec<Vec<u8>> = if channels.is_empty() {
            let set = if pattern {
                &mut self.patterns
            } else {
                &mut self.channels
            };
            // Left one by one below, so that each confirmation counts down.
            let mut all: Vec<(Vec<u8>, u64)> =
                set.iter().map(|(name, at)| (name.clone(), *at)).collect();
            all.sort_unstable_by_key(|(_, joined)| *joined);
            all.into_iter().map(|(name, _)| name).collect()
        } else {
            channels.to_vec()
        };
        if targets.is_empty() {
            let mut out = resp::aggregate(3, self.conn.resp3);
            out.extend(resp::bulk(kind.as_bytes()));
            out.extend(resp::null(self.conn.resp3));
            out.extend(resp::integer(self.count() as i64));
            return out;
        }
        let mut out = Vec::new();
        for channel in targets {
            let set = if pattern {
                &mut self.patterns
            } else {
                &mut self.channels
            };
            if set.remove(&channel).is_some() {
                self.name_bytes -= channel.len();
            }
            out.extend(resp::subscription(
                kind,
                &channel,
                self.count(),
                self.conn.resp3,
            ));
        }
        out
    }

    /// Runs every complete command buffered so far, up to one that ends the session.
    fn drain(&mut self, replies: &mut Vec<u8>) -> Option<CloseReason> {
        loop {
            let command = match self.conn.decoder.next_command() {
                Ok(Some(command)) => command,
                Ok(None) => return None,
                Err(err) => {
                    let why = format!("Protocol error: {err}");
                    replies.extend_from_slice(&resp::error(&format!("ERR {why}")));
                    return Some(CloseReason::Protocol {
                        code: close_code::PROTOCOL_ERROR,
                        why: why.into(),
                    });
                }
            };
            let (reply, ended) = self.run(&command);
            replies.extend_from_slice(&reply);
            if ended {
                return Some(CloseReason::ClientClosed);
            }
        }
    }

    /// One command in push mode: the reply, and whether the session ends after it
    /// (`left` says whether the connection stays).
    fn run(&mut self, command: &Command) -> (Vec<u8>, bool) {
        let name = upper(&command[0]);
        let args = &command[1..];
        let resp3 = self.conn.resp3;
        match name.as_str() {
            "PING" if args.len() <= 1 => (
                resp::pong(args.first().map(Vec::as_slice), true, resp3),
                false,
            ),
            "PING" => (wrong_arity(&name), false),
            "SUBSCRIBE" | "PSUBSCRIBE" if !args.is_empty() => {
                match self.add(args, name == "PSUBSCRIBE") {
                    Ok(reply) | Err(reply) => (reply, false),
                }
            }
            "SUBSCRIBE" | "PSUBSCRIBE" => (wrong_arity(&name), false),
            "UNSUBSCRIBE" | "PUNSUBSCRIBE" => {
                let reply = self.remove(args, name == "PUNSUBSCRIBE");
                let ended = self.count() == 0;
                if ended {
                    self.left = Some(Leave::Unsubscribed);
                }
                (reply, ended)
            }
            "QUIT" => (resp::simple("OK"), true),
            "RESET" => {
                self.left = Some(Leave::Reset);
                (resp::simple("RESET"), true)
            }
            "SSUBSCRIBE" | "SUNSUBSCRIBE" => (no_shard_channels(&name), false),
            // RESP3 lifts Redis's subscribed-mode restriction: a client may go on using
            // the connection for anything else.
            _ if resp3 => match self.conn.common(&name, args, true) {
                Some(reply) => (reply, false),
                None => (
                    resp::error(&format!("ERR unknown command '{}'", text(&command[0]))),
                    false,
                ),
            },
            _ => (
                resp::error(&format!(
                    "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                    text(&command[0]).to_ascii_lowercase()
                )),
                false,
            ),
        }
    }
}

impl Inbound for Subscriber {
    fn on_bytes(
        &mut self,
        _shard: &Shard,
        _session: &Session,
        bytes: &[u8],
        replies: &mut Vec<u8>,
    ) -> Option<CloseReason> {
        self.conn.decoder.feed(bytes);
        self.drain(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conn_id_holds_a_bounded_number_of_places_given_back_on_drop() {
        let counts = Rc::new(Authenticated::default());
        let places: Vec<AuthPlace> = (0..MAX_AUTHENTICATED_PER_CONN_ID)
            .map(|_| counts.take("a"))
            .collect();
        assert!(!counts.has_room("a"));
        assert!(counts.has_room("b"));
        let other = counts.take("b");
        assert_eq!(counts.total(), MAX_AUTHENTICATED_PER_CONN_ID + 1);
        drop(places);
        drop(other);
        assert!(counts.has_room("a"));
        assert_eq!(counts.total(), 0);
        assert!(
            counts.by_conn_id.borrow().is_empty(),
            "no entry left behind"
        );
    }

    fn subscriber(resp3: bool) -> Subscriber {
        let mut conn = Conn::new(b"");
        conn.resp3 = resp3;
        Subscriber::new(conn)
    }

    fn command(words: &[&str]) -> Command {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    fn verify_step(step: Step) -> (ClientToken, AfterVerify) {
        match step {
            Step::Verify { token, then } => (token, then),
            other => panic!("expected a verification, got {other:?}"),
        }
    }

    #[test]
    fn auth_asks_for_a_verification_and_ok_follows_it() {
        let mut conn = Conn::new(b"");
        let (token, then) = verify_step(conn.step(command(&["AUTH", "alice", "secret"])));
        assert_eq!(
            (token.conn_id.as_str(), token.token.as_str()),
            ("alice", "secret")
        );
        assert_eq!(then, AfterVerify::Auth);
        assert!(conn.credentials.is_none(), "not before it is verified");
        assert_eq!(conn.verified(Ok(token), then), b"+OK\r\n");
        assert_eq!(conn.credentials.as_ref().unwrap().conn_id, "alice");
    }

    #[test]
    fn reset_before_auth_does_not_restart_the_handshake_timeout() {
        let mut conn = Conn::new(b"");
        let opened = conn.unauthenticated_since;
        std::thread::sleep(std::time::Duration::from_millis(2));
        conn.reset();
        assert_eq!(conn.unauthenticated_since, opened);
        let (token, then) = verify_step(conn.step(command(&["AUTH", "alice", "pw"])));
        conn.verified(Ok(token), then);
        conn.reset();
        assert!(
            conn.unauthenticated_since > opened,
            "authenticated, then reset"
        );
    }

    #[test]
    fn a_connection_gets_three_tries_at_a_token() {
        let mut conn = Conn::new(b"");
        for _ in 0..2 {
            let (_, then) = verify_step(conn.step(command(&["AUTH", "alice", "guess"])));
            conn.verified(Err(Refusal::Token), then);
            assert!(!conn.out_of_attempts());
        }
        // Refusals that are not the token's do not count, nor does RESET start over.
        let (_, then) = verify_step(conn.step(command(&["AUTH", "alice", "pw"])));
        conn.verified(Err(Refusal::Saturated), then);
        conn.reset();
        assert!(!conn.out_of_attempts());
        let (_, then) = verify_step(conn.step(command(&["AUTH", "alice", "guess"])));
        let reply = conn.verified(Err(Refusal::Token), then);
        assert!(
            reply.starts_with(b"-WRONGPASS"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert!(conn.out_of_attempts());
    }

    #[test]
    fn a_refused_auth_keeps_the_earlier_credentials() {
        let mut conn = Conn::new(b"");
        let (token, then) = verify_step(conn.step(command(&["AUTH", "alice", "pw"])));
        conn.verified(Ok(token), then);
        let (_, then) = verify_step(conn.step(command(&["AUTH", "bob", "pw"])));
        let reply = conn.verified(Err(Refusal::Duplicate), then);
        assert!(
            reply.starts_with(b"-ERR "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert_eq!(conn.credentials.as_ref().unwrap().conn_id, "alice");
    }

    #[test]
    fn malformed_credentials_are_refused_without_a_verification() {
        let mut conn = Conn::new(b"");
        for words in [
            &["AUTH", "", "pw"][..],
            &["AUTH", "{not json"],
            &["AUTH", "pw-only"],
        ] {
            match conn.step(command(words)) {
                Step::Refuse { reason, reply } => {
                    assert_eq!(reason, "token");
                    assert_eq!(reply[0], b'-');
                }
                other => panic!("{words:?}: {other:?}"),
            }
        }
        assert!(
            matches!(conn.step(command(&["AUTH"])), Step::Reply(r) if r.starts_with(b"-ERR wrong number"))
        );
    }

    #[test]
    fn hello_with_auth_switches_protocol_only_once_verified() {
        let mut conn = Conn::new(b"");
        let step = conn.step(command(&[
            "HELLO",
            "3",
            "AUTH",
            "default",
            r#"{"conn_id":"c","token":"t"}"#,
            "SETNAME",
            "app",
        ]));
        let (token, then) = verify_step(step);
        assert_eq!(then, AfterVerify::Hello { protocol: 3 });
        assert_eq!((token.conn_id.as_str(), token.info.as_str()), ("c", "app"));
        assert!(!conn.resp3);
        let refused = conn.verified(Err(Refusal::Duplicate), then);
        assert_eq!(refused[0], b'-');
        assert!(!conn.resp3, "a refused HELLO AUTH keeps RESP2");
        let reply = conn.verified(Ok(token), then);
        assert!(conn.resp3);
        assert_eq!(reply[0], b'%', "RESP3 HELLO replies with a map");
    }

    #[test]
    fn hello_without_auth_answers_at_once() {
        let mut conn = Conn::new(b"");
        assert!(matches!(conn.step(command(&["HELLO", "3"])), Step::Reply(r) if r[0] == b'%'));
        assert!(conn.resp3);
        assert!(
            matches!(conn.step(command(&["HELLO", "4"])), Step::Reply(r) if r.starts_with(b"-NOPROTO"))
        );
    }

    #[test]
    fn subscribe_quit_and_ping_before_push_mode() {
        let mut conn = Conn::new(b"");
        assert!(matches!(
            conn.step(command(&["SUBSCRIBE", "a", "b"])),
            Step::Subscribe { channels, pattern: false } if channels.len() == 2
        ));
        assert!(matches!(
            conn.step(command(&["PSUBSCRIBE", "p*"])),
            Step::Subscribe { pattern: true, .. }
        ));
        assert!(
            matches!(conn.step(command(&["SUBSCRIBE"])), Step::Reply(r) if r.starts_with(b"-ERR wrong number"))
        );
        assert!(matches!(conn.step(command(&["QUIT"])), Step::Quit));
        assert!(matches!(conn.step(command(&["PING"])), Step::Reply(r) if r == b"+PONG\r\n"));
        assert!(
            matches!(conn.step(command(&["FLUSHALL"])), Step::Reply(r) if r.starts_with(b"-ERR unknown command"))
        );
    }

    #[test]
    fn leaving_every_channel_confirms_them_in_the_order_joined() {
        let mut s = subscriber(false);
        let names: Vec<Vec<u8>> = (0..50).map(|n| format!("c{n}").into_bytes()).collect();
        s.add(&names, false).unwrap();
        s.add(&names[..5], false).unwrap();
        let reply = s.remove(&[], false);
        let mut expected = Vec::new();
        for (n, name) in names.iter().enumerate() {
            expected.extend(resp::subscription("unsubscribe", name, 49 - n, false));
        }
        assert_eq!(reply, expected);
    }

    #[test]
    fn leaving_the_last_channel_ends_the_session_but_not_the_connection() {
        let mut s = subscriber(false);
        s.add(&[b"a".to_vec(), b"b".to_vec()], false).unwrap();
        let (reply, ended) = s.run(&command(&["UNSUBSCRIBE", "a"]));
        assert_eq!(reply, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n");
        assert!(!ended);
        assert_eq!(s.left, None);
        let (_, ended) = s.run(&command(&["unsubscribe"]));
        assert!(ended);
        assert_eq!(s.left, Some(Leave::Unsubscribed));
    }

    #[test]
    fn a_pattern_left_keeps_the_session() {
        let mut s = subscriber(false);
        s.add(&[b"a".to_vec()], false).unwrap();
        s.add(&[b"p*".to_vec()], true).unwrap();
        let (reply, ended) = s.run(&command(&["UNSUBSCRIBE"]));
        assert_eq!(reply, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n");
        assert!(!ended);
        let (reply, ended) = s.run(&command(&["PUNSUBSCRIBE", "p*"]));
        assert_eq!(reply, b"*3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:0\r\n");
        assert!(ended);
    }

    #[test]
    fn quit_and_reset_end_the_session_differently() {
        let mut s = subscriber(false);
        s.add(&[b"a".to_vec()], false).unwrap();
        assert_eq!(s.run(&command(&["QUIT"])), (b"+OK\r\n".to_vec(), true));
        assert_eq!(s.left, None, "QUIT closes the connection");
        let mut s = subscriber(true);
        s.add(&[b"a".to_vec()], false).unwrap();
        assert_eq!(s.run(&command(&["reset"])), (b"+RESET\r\n".to_vec(), true));
        assert_eq!(s.left, Some(Leave::Reset));
        s.conn.credentials = Some(ClientToken {
            conn_id: "c".into(),
            token: "t".into(),
            info: String::new(),
            recovery: Default::default(),
        });
        s.conn.reset();
        assert!(s.conn.credentials.is_none() && !s.conn.resp3);
    }

    #[test]
    fn resp2_push_mode_refuses_other_commands_and_answers_ping_as_redis_does() {
        let mut s = subscriber(false);
        s.add(&[b"a".to_vec()], false).unwrap();
        let (reply, ended) = s.run(&command(&["GET", "k"]));
        assert_eq!(
            reply,
            b"-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
        );
        assert!(!ended);
        assert!(
            s.run(&command(&["INFO"]))
                .0
                .starts_with(b"-ERR Can't execute 'info'")
        );
        assert_eq!(
            s.run(&command(&["PING"])).0,
            b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
        );
        assert_eq!(
            s.run(&command(&["PING", "hi"])).0,
            b"*2\r\n$4\r\npong\r\n$2\r\nhi\r\n"
        );
        assert!(
            s.run(&command(&["SSUBSCRIBE", "x"]))
                .0
                .starts_with(b"-ERR ssubscribe is not supported")
        );
    }

    #[test]
    fn resp3_push_mode_answers_what_it_answers_before() {
        let mut s3 = subscriber(true);
        s3.add(&[b"a".to_vec()], false).unwrap();
        assert_eq!(s3.run(&command(&["PING"])).0, b"+PONG\r\n");
        assert!(s3.run(&command(&["INFO", "server"])).0.starts_with(b"$"));
        assert_eq!(s3.run(&command(&["CLIENT", "SETNAME", "n"])).0, b"+OK\r\n");
        assert_eq!(s3.run(&command(&["CLIENT", "GETNAME"])).0, b"$1\r\nn\r\n");
        assert!(
            s3.run(&command(&["GET", "k"]))
                .0
                .starts_with(b"-ERR unknown command 'GET'")
        );
        assert!(
            s3.run(&command(&["AUTH", "x", "y"]))
                .0
                .starts_with(b"-ERR AUTH is not allowed")
        );
        assert!(
            s3.run(&command(&["HELLO", "2"]))
                .0
                .starts_with(b"-ERR cannot switch protocol")
        );
        assert!(s3.run(&command(&["HELLO", "3"])).0.starts_with(b"%7\r\n"));
        assert!(!s3.run(&command(&["HELLO", "3"])).1);
    }

    #[test]
    fn channels_are_capped_per_connection_without_a_close() {
        let mut s = subscriber(false);
        let names: Vec<Vec<u8>> = (0..MAX_CHANNELS - 1)
            .map(|n| format!("c{n}").into_bytes())
            .collect();
        s.add(&names, false).unwrap();
        // Names already held cost nothing.
        s.add(&names[..10], false).unwrap();
        let refused = s
            .add(&[b"new-1".to_vec(), b"new-2".to_vec()], false)
            .unwrap_err();
        assert!(
            refused
                .starts_with(b"-ERR too many channels: a connection may subscribe to at most 1024")
        );
        assert_eq!(s.count(), MAX_CHANNELS - 1, "refused as a whole");
        let (reply, ended) = s.run(&command(&["PSUBSCRIBE", "last*"]));
        assert!(
            reply.ends_with(b":1024\r\n"),
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
        assert!(!ended);
        let (reply, _) = s.run(&command(&["SUBSCRIBE", "one-more"]));
        assert!(reply.starts_with(b"-ERR too many channels"));
    }

    #[test]
    fn channel_names_are_capped_in_bytes_per_connection() {
        let mut s = subscriber(false);
        let long = |tag: usize| format!("{tag:04}{}", "n".repeat(16 * 1024 - 4)).into_bytes();
        let four: Vec<Vec<u8>> = (0..4).map(long).collect();
        s.add(&four, false).unwrap();
        let refused = s.add(&[b"x".to_vec()], true).unwrap_err();
        assert!(
            refused.starts_with(
                b"-ERR too many channels: a connection's channel and pattern names may take at most 65536 bytes (it has 65536, this command adds 1)"
            ),
            "{:?}",
            String::from_utf8_lossy(&refused)
        );
        assert_eq!(s.count(), 4, "refused as a whole");
        // Leaving gives the bytes back, and a name left twice is counted once.
        s.remove(&four[..1], false);
        s.remove(&four[..1], false);
        s.add(&[b"x".to_vec()], true).unwrap();
        s.remove(&[], false);
        s.remove(&[], true);
        assert_eq!((s.count(), s.name_bytes), (0, 0));
    }

    #[test]
    fn many_channels_are_added_and_left_in_linear_time() {
        // The review's flood: thousands of SUBSCRIBE commands on one connection. With a
        // list this was quadratic; with sets it is instant.
        let mut s = subscriber(false);
        let started = Instant::now();
        for round in 0..200 {
            for n in 0..5 {
                let _ = s.add(&[format!("c{}", round * 5 + n).into_bytes()], false);
            }
        }
        assert_eq!(s.count(), 1000);
        let reply = s.remove(&[], false);
        assert_eq!(
            reply.windows(11).filter(|w| w == b"unsubscribe").count(),
            1000
        );
        assert_eq!(s.count(), 0);
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn replies_a_client_does_not_read_count_against_its_byte_budget() {
        // No socket: every reply stays queued, as for a client that never reads. The
        // session loop stops reading past the budget; the sweep then ends the client as
        // a slow consumer (session.rs, transport/mod.rs).
        let session = Session::new(crate::session::SessionSpec {
            conn_id: "deaf".into(),
            info: String::new(),
            wire: Wire::Resp,
            message_head: Box::default(),
            direct_fd: None,
            queue_limit: 16,
            queue_bytes: 1 << 20,
            recover: false,
        });
        let mut s = subscriber(false);
        s.add(&[b"a".to_vec()], false).unwrap();
        let payload = "e".repeat(8 * 1024);
        let text = resp::bulk(payload.as_bytes());
        // PING <text>, answered in push mode with the text: replies as large as commands.
        let mut wire = b"*2\r\n$4\r\nPING\r\n".to_vec();
        wire.extend(&text);
        let mut reads = 0;
        while !session.is_over_budget() {
            s.conn.decoder.feed(&wire);
            s.conn.decoder.feed(&wire);
            reads += 1;
            let mut replies = Vec::new();
            assert_eq!(s.drain(&mut replies), None);
            answer(&session, &mut replies);
            assert!(reads < 1000, "never over budget");
        }
        let queued = session.backlog_bytes();
        assert!(
            ((1 << 20)..(1 << 20) + 64 * 1024).contains(&queued),
            "{queued}"
        );
    }

    #[test]
    fn credentials_take_a_token_object_as_the_password_of_default() {
        let object = br#"{"conn_id":"dev-1","token":"s3","info":"from-object"}"#;
        for user in [None, Some(&b""[..]), Some(&b"default"[..])] {
            let token = credentials(user, object, Some("named")).unwrap();
            assert_eq!(
                (
                    token.conn_id.as_str(),
                    token.token.as_str(),
                    token.info.as_str()
                ),
                ("dev-1", "s3", "from-object"),
                "{user:?}"
            );
        }
        // Without info in the object the connection's name is the info.
        let token = credentials(
            Some(b"default"),
            br#"{"conn_id":"dev-1","token":"s3"}"#,
            Some("named"),
        )
        .unwrap();
        assert_eq!(token.info, "named");
        // A user called `default` with a plain password is still that conn_id.
        let token = credentials(Some(b"default"), b"secret", None).unwrap();
        assert_eq!(
            (token.conn_id.as_str(), token.token.as_str()),
            ("default", "secret")
        );
        // Another user keeps an object-looking password as its token.
        let token = credentials(Some(b"alice"), object, None).unwrap();
        assert_eq!(token.conn_id, "alice");
        assert!(
            credentials(Some(b"default"), b"{not json", None)
                .unwrap_err()
                .starts_with("WRONGPASS")
        );
        assert!(
            credentials(None, b"secret", None)
                .unwrap_err()
                .starts_with("ERR AUTH needs")
        );
        assert!(
            credentials(Some(b""), b"secret", None)
                .unwrap_err()
                .starts_with("WRONGPASS conn_id")
        );
    }

    #[test]
    fn client_setinfo_is_validated_as_redis_does() {
        let mut conn = Conn::new(b"");
        let mut run = |words: &[&str]| {
            conn.common(&upper(words[0].as_bytes()), &command(words)[1..], false)
                .unwrap()
        };
        assert_eq!(
            run(&["CLIENT", "SETINFO", "LIB-NAME", "ioredis"]),
            b"+OK\r\n"
        );
        assert_eq!(run(&["client", "setinfo", "lib-ver", "5.4.1"]), b"+OK\r\n");
        assert_eq!(
            run(&["CLIENT", "SETINFO", "lib-colour", "x"]),
            b"-ERR Unrecognized option 'lib-colour'\r\n"
        );
        assert_eq!(
            run(&["CLIENT", "SETINFO", "LIB-NAME", "a b"]),
            b"-ERR lib-name cannot contain spaces, newlines or special characters.\r\n"
        );
        assert_eq!(
            run(&["CLIENT", "SETINFO", "LIB-NAME"]),
            b"-ERR wrong number of arguments for 'client|setinfo' command\r\n"
        );
        assert_eq!(
            run(&[
                "CLIENT",
                "MAINT_NOTIFICATIONS",
                "ON",
                "moving-endpoint-type",
                "none"
            ]),
            b"+OK\r\n"
        );
        assert!(run(&["CLIENT", "KILL", "x"]).starts_with(b"-ERR unknown subcommand 'KILL'"));
        assert_eq!(run(&["CLIENT", "GETNAME"]), b"$-1\r\n");
        assert!(run(&["CLIENT", "ID"]).starts_with(b":"));
        assert_eq!(run(&["SELECT", "0"]), b"+OK\r\n");
        assert_eq!(run(&["READONLY"]), b"+OK\r\n");
        assert!(run(&["INFO"]).windows(9).any(|w| w == b"loading:0"));
    }

    #[test]
    fn hello_is_parsed_with_its_options() {
        let args = command(&["3", "AUTH", "default", "pw", "SETNAME", "n"]);
        let (protocol, auth, name) = parse_hello(&args, false).unwrap();
        assert_eq!(protocol, 3);
        assert_eq!(auth, Some((b"default".to_vec(), b"pw".to_vec())));
        assert_eq!(name.as_deref(), Some("n"));
        assert_eq!(parse_hello(&[], true).unwrap().0, 3);
        assert!(
            parse_hello(&command(&["4"]), false)
                .unwrap_err()
                .starts_with(b"-NOPROTO")
        );
        assert!(
            parse_hello(&command(&["3", "AUTH", "u"]), false)
                .unwrap_err()
                .starts_with(b"-ERR syntax error")
        );
    }

    #[test]
    fn unsubscribing_with_nothing_subscribed_answers_as_redis() {
        assert_eq!(
            nothing_to_leave("unsubscribe", false),
            b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n"
        );
        assert_eq!(
            nothing_to_leave("punsubscribe", true),
            b">3\r\n$12\r\npunsubscribe\r\n_\r\n:0\r\n"
        );
    }
}
