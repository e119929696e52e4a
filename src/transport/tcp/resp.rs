//! RESP over TCP: stock Redis clients as Comet clients.
//!
//! Before push mode the connection answers the commands a Redis client sends on connect
//! (`HELLO`, `AUTH`, `CLIENT SETNAME`/`SETINFO`, `SELECT 0`, `PING`, `ECHO`, `QUIT`), with
//! `AUTH <conn_id> <token>` admitting the client exactly as a WebSocket upgrade would.
//! `SUBSCRIBE <any channel>` (or `PSUBSCRIBE`) registers the session: it is online from
//! there, and every push arrives as a pub/sub message on the first channel it named.
//! Leaving every channel ends the session. RESP has no ping a client must answer, so
//! dead peers are found by TCP keepalive (set on every raw TCP socket, see
//! [`super::enable_keepalive`]) instead of the heartbeat timeout.

use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::codec::Wire;
use crate::codec::resp::{self, Command, CommandDecoder};
use crate::session::{CloseReason, Session};
use crate::shard::Shard;
use crate::transport::admission::{self, Admitted, Refusal};
use crate::transport::ws::frame::close_code;
use crate::transport::ws::handshake::ClientToken;
use crate::transport::{ClientStream, Inbound, close, run_session};

/// Client ids for `HELLO` answers, unique in the process.
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// Serves a RESP client; `first` holds bytes already read from it.
pub async fn serve<S: ClientStream>(
    shard: &Rc<Shard>,
    mut stream: S,
    direct_fd: Option<RawFd>,
    first: Vec<u8>,
) {
    let Some((session, mut inbound)) =
        Box::pin(prepare(shard, &mut stream, direct_fd, first)).await
    else {
        return;
    };
    let reason = match inbound.drain(session.as_ref()) {
        Some(reason) => reason,
        None => run_session(shard, &mut stream, &session, &mut inbound).await,
    };
    shard.unregister(&session, &reason);
    Box::pin(close(shard, &mut stream, &session, reason)).await;
}

/// A connection before push mode.
struct Greeting<'a> {
    shard: &'a Shard,
    resp3: bool,
    name: Option<String>,
    admitted: Option<Admitted<'a>>,
    client_id: u64,
}

/// What a command before push mode leads to.
enum Step {
    Reply(Vec<u8>),
    Subscribe {
        channels: Vec<Vec<u8>>,
        pattern: bool,
    },
    Quit,
}

/// Runs commands until the client subscribes (returning the registered session) or
/// leaves.
async fn prepare<S: ClientStream>(
    shard: &Shard,
    stream: &mut S,
    direct_fd: Option<RawFd>,
    first: Vec<u8>,
) -> Option<(Rc<Session>, Subscriber)> {
    let mut decoder = CommandDecoder::default();
    decoder.feed(&first);
    let mut greeting = Greeting {
        shard,
        resp3: false,
        name: None,
        admitted: None,
        client_id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
    };
    let started = std::time::Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match decoder.next_command() {
            Ok(Some(command)) => match greeting.step(command).await {
                Step::Reply(reply) => {
                    if !crate::transport::write_reply(
                        stream,
                        &reply,
                        shard.config.handshake_timeout,
                    )
                    .await
                    {
                        return None;
                    }
                }
                Step::Quit => {
                    let _ = crate::transport::write_reply(
                        stream,
                        &resp::simple("OK"),
                        shard.config.close_timeout,
                    )
                    .await;
                    return None;
                }
                Step::Subscribe { channels, pattern } => {
                    return greeting
                        .subscribe(stream, direct_fd, channels, pattern, decoder)
                        .await;
                }
            },
            Ok(None) => {
                // Unauthenticated clients get the handshake timeout in all; authenticated
                // ones a heartbeat timeout between commands.
                let limit = match greeting.admitted {
                    None => shard
                        .config
                        .handshake_timeout
                        .saturating_sub(started.elapsed()),
                    Some(_) => shard.config.heartbeat_timeout,
                };
                match super::read_within(stream, &mut chunk, limit).await {
                    Some(n) if n > 0 => decoder.feed(&chunk[..n]),
                    Some(_) => return None,
                    None => {
                        if greeting.admitted.is_none() {
                            shard.handshake_refused("timeout");
                            tracing::info!(
                                shard = shard.id,
                                "RESP client did not authenticate in time"
                            );
                        }
                        return None;
                    }
                }
            }
            Err(err) => {
                shard.handshake_refused("bad_request");
                tracing::info!(shard = shard.id, error = %err, "RESP client sent a malformed command");
                let reply = resp::error(&format!("ERR Protocol error: {err}"));
                let _ =
                    crate::transport::write_reply(stream, &reply, shard.config.close_timeout).await;
                return None;
            }
        }
    }
}

fn upper(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).to_ascii_uppercase()
}

fn text(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

fn wrong_arity(name: &str) -> Step {
    Step::Reply(resp::error(&format!(
        "ERR wrong number of arguments for '{}' command",
        name.to_ascii_lowercase()
    )))
}

impl<'a> Greeting<'a> {
    async fn step(&mut self, command: Command) -> Step {
        let name = upper(&command[0]);
        let args = &command[1..];
        match name.as_str() {
            "PING" => match args {
                [] | [_] => Step::Reply(resp::pong(
                    args.first().map(Vec::as_slice),
                    false,
                    self.resp3,
                )),
                _ => wrong_arity(&name),
            },
            "ECHO" => match args {
                [message] => Step::Reply(resp::bulk(message)),
                _ => wrong_arity(&name),
            },
            "QUIT" => Step::Quit,
            "SELECT" => match args {
                [db] if db.as_slice() == b"0" => Step::Reply(resp::simple("OK")),
                [_] => Step::Reply(resp::error(
                    "ERR DB index is out of range (Comet has only db 0)",
                )),
                _ => wrong_arity(&name),
            },
            "CLIENT" => self.client(args),
            "AUTH" => match args {
                [user, password] => self.auth(text(user), text(password)).await,
                [password] => self.auth_with_token_object(password).await,
                _ => wrong_arity(&name),
            },
            "HELLO" => self.hello(args).await,
            "SUBSCRIBE" | "PSUBSCRIBE" if args.is_empty() => wrong_arity(&name),
            "SUBSCRIBE" | "PSUBSCRIBE" if self.admitted.is_none() => Step::Reply(resp::error(
                "NOAUTH Authentication required: AUTH <conn_id> <token> first",
            )),
            "SUBSCRIBE" | "PSUBSCRIBE" => Step::Subscribe {
                channels: args.to_vec(),
                pattern: name == "PSUBSCRIBE",
            },
            _ => Step::Reply(resp::error(&format!(
                "ERR unknown command '{}': Comet accepts HELLO, AUTH, CLIENT, SELECT, PING, ECHO, QUIT, SUBSCRIBE, PSUBSCRIBE",
                text(&command[0])
            ))),
        }
    }

    fn client(&mut self, args: &[Vec<u8>]) -> Step {
        let Some(sub) = args.first() else {
            return wrong_arity("client");
        };
        match (upper(sub).as_str(), &args[1..]) {
            ("SETNAME", [name]) => {
                let name = text(name);
                if let Some(admitted) = &mut self.admitted {
                    admitted.set_info(name.clone());
                }
                self.name = Some(name);
                Step::Reply(resp::simple("OK"))
            }
            ("SETINFO", [_, _]) => Step::Reply(resp::simple("OK")),
            ("GETNAME", []) => Step::Reply(match &self.name {
                Some(name) => resp::bulk(name.as_bytes()),
                None if self.resp3 => b"_\r\n".to_vec(),
                None => b"$-1\r\n".to_vec(),
            }),
            ("ID", []) => Step::Reply(resp::integer(self.client_id as i64)),
            _ => Step::Reply(resp::error(&format!(
                "ERR unsupported CLIENT subcommand '{}': Comet accepts SETNAME, SETINFO, GETNAME, ID",
                text(sub)
            ))),
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    async fn hello(&mut self, args: &[Vec<u8>]) -> Step {
        let mut protocol = if self.resp3 { 3 } else { 2 };
        let mut rest = args;
        if let [version, tail @ ..] = rest {
            protocol = match version.as_slice() {
                b"2" => 2,
                b"3" => 3,
                _ => return Step::Reply(resp::error("NOPROTO unsupported protocol version")),
            };
            rest = tail;
        }
        let mut credentials = None;
        while let [option, tail @ ..] = rest {
            match (upper(option).as_str(), tail) {
                ("AUTH", [user, password, more @ ..]) => {
                    credentials = Some((text(user), text(password)));
                    rest = more;
                }
                ("SETNAME", [name, more @ ..]) => {
                    self.name = Some(text(name));
                    rest = more;
                }
                _ => {
                    return Step::Reply(resp::error(&format!(
                        "ERR syntax error in HELLO option '{}'",
                        text(option)
                    )));
                }
            }
        }
        if let Some((user, password)) = credentials
            && let Step::Reply(refused) = self.auth(user, password).await
            && refused.first() == Some(&b'-')
        {
            return Step::Reply(refused);
        }
        self.resp3 = protocol == 3;
        Step::Reply(resp::hello(
            protocol,
            self.client_id,
            env!("CARGO_PKG_VERSION"),
        ))
    }

    /// The password as a whole token object: `AUTH {"conn_id":..,"token":..,"info":..}`.
    async fn auth_with_token_object(&mut self, password: &[u8]) -> Step {
        match crate::transport::ws::handshake::token_from_json(password) {
            Ok(token) => self.admit(token).await,
            Err(_) => Step::Reply(resp::error(
                "ERR AUTH needs <conn_id> <token>, or one token object {\"conn_id\":..,\"token\":..,\"info\":..}",
            )),
        }
    }

    async fn auth(&mut self, conn_id: String, token: String) -> Step {
        if conn_id.is_empty() || conn_id.len() > 256 {
            return Step::Reply(resp::error("WRONGPASS conn_id must be 1 to 256 bytes"));
        }
        let info = self.name.clone().unwrap_or_default();
        self.admit(ClientToken {
            conn_id,
            token,
            info,
        })
        .await
    }

    async fn admit(&mut self, token: ClientToken) -> Step {
        if let Some(admitted) = &self.admitted {
            return Step::Reply(resp::error(&format!(
                "ERR already authenticated as {}",
                admitted.conn_id()
            )));
        }
        match admission::admit(self.shard, token).await {
            Ok(admitted) => {
                self.admitted = Some(admitted);
                Step::Reply(resp::simple("OK"))
            }
            Err(refusal) => {
                self.shard.handshake_refused(refusal.label());
                tracing::info!(shard = self.shard.id, reason = %refusal, "RESP client refused");
                Step::Reply(resp::error(&refusal_text(&refusal)))
            }
        }
    }

    /// Confirms the subscriptions, then registers the session: confirmations go out
    /// before any push can.
    async fn subscribe<S: ClientStream>(
        self,
        stream: &mut S,
        direct_fd: Option<RawFd>,
        channels: Vec<Vec<u8>>,
        pattern: bool,
        decoder: CommandDecoder,
    ) -> Option<(Rc<Session>, Subscriber)> {
        let mut subscriber = Subscriber {
            decoder,
            resp3: self.resp3,
            channels: Vec::new(),
        };
        let confirmations = subscriber.add(&channels, pattern);
        if !crate::transport::write_reply(
            stream,
            &confirmations,
            self.shard.config.handshake_timeout,
        )
        .await
        {
            return None;
        }
        let head = resp::message_prefix(&channels[0], pattern, self.resp3);
        let admitted = self.admitted?;
        let session = admitted.register(Wire::Resp, head.into_boxed_slice(), direct_fd);
        Some((session, subscriber))
    }
}

fn refusal_text(refusal: &Refusal) -> String {
    match refusal {
        Refusal::Token(_) => format!("WRONGPASS {refusal}"),
        Refusal::Duplicate => format!("ERR {refusal}"),
        Refusal::MessageServer(_) | Refusal::Saturated => {
            let retry = refusal.retry_after().unwrap_or(1);
            format!("TRYAGAIN {refusal} (retry after {retry} s)")
        }
    }
}

/// A connection in push mode: what it may still ask.
struct Subscriber {
    decoder: CommandDecoder,
    resp3: bool,
    channels: Vec<(Vec<u8>, bool)>,
}

impl Subscriber {
    /// Adds subscriptions; returns their confirmations.
    fn add(&mut self, channels: &[Vec<u8>], pattern: bool) -> Vec<u8> {
        let kind = if pattern { "psubscribe" } else { "subscribe" };
        let mut out = Vec::new();
        for channel in channels {
            if !self
                .channels
                .iter()
                .any(|(c, p)| c == channel && *p == pattern)
            {
                self.channels.push((channel.clone(), pattern));
            }
            out.extend(resp::subscription(
                kind,
                channel,
                self.channels.len(),
                self.resp3,
            ));
        }
        out
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
            self.channels
                .iter()
                .filter(|(_, p)| *p == pattern)
                .map(|(c, _)| c.clone())
                .collect()
        } else {
            channels.to_vec()
        };
        if targets.is_empty() {
            let mut out = resp::aggregate(3, self.resp3);
            out.extend(resp::bulk(kind.as_bytes()));
            out.extend(if self.resp3 {
                b"_\r\n".to_vec()
            } else {
                b"$-1\r\n".to_vec()
            });
            out.extend(resp::integer(self.channels.len() as i64));
            return out;
        }
        let mut out = Vec::new();
        for channel in targets {
            self.channels
                .retain(|(c, p)| !(c == &channel && *p == pattern));
            out.extend(resp::subscription(
                kind,
                &channel,
                self.channels.len(),
                self.resp3,
            ));
        }
        out
    }

    /// Runs every complete command buffered so far.
    fn drain(&mut self, session: &Session) -> Option<CloseReason> {
        loop {
            let command = match self.decoder.next_command() {
                Ok(Some(command)) => command,
                Ok(None) => return None,
                Err(err) => {
                    let why = format!("Protocol error: {err}");
                    session.send_control(&Arc::from(resp::error(&format!("ERR {why}"))));
                    return Some(CloseReason::Protocol {
                        code: close_code::PROTOCOL_ERROR,
                        why: why.into(),
                    });
                }
            };
            let (reply, ended) = self.run(&command);
            session.send_control(&Arc::from(reply));
            if ended {
                return Some(CloseReason::ClientClosed);
            }
        }
    }

    /// One command in push mode: the reply, and whether the session ends after it.
    fn run(&mut self, command: &Command) -> (Vec<u8>, bool) {
        let name = upper(&command[0]);
        let args = &command[1..];
        match name.as_str() {
            "PING" if args.len() <= 1 => (
                resp::pong(args.first().map(Vec::as_slice), true, self.resp3),
                false,
            ),
            "SUBSCRIBE" | "PSUBSCRIBE" if !args.is_empty() => {
                (self.add(args, name == "PSUBSCRIBE"), false)
            }
            "UNSUBSCRIBE" | "PUNSUBSCRIBE" => {
                let reply = self.remove(args, name == "PUNSUBSCRIBE");
                (reply, self.channels.is_empty())
            }
            "QUIT" => (resp::simple("OK"), true),
            _ => (
                resp::error(&format!(
                    "ERR Can't execute '{}': only (P)SUBSCRIBE / (P)UNSUBSCRIBE / PING / QUIT are allowed in this context",
                    text(&command[0]).to_ascii_lowercase()
                )),
                false,
            ),
        }
    }
}

impl Inbound for Subscriber {
    fn on_bytes(&mut self, _shard: &Shard, session: &Session, bytes: &[u8]) -> Option<CloseReason> {
        self.decoder.feed(bytes);
        self.drain(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriber(resp3: bool) -> Subscriber {
        Subscriber {
            decoder: CommandDecoder::default(),
            resp3,
            channels: Vec::new(),
        }
    }

    fn command(words: &[&str]) -> Command {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn leaving_the_last_channel_ends_push_mode() {
        let mut s = subscriber(false);
        s.add(&[b"a".to_vec(), b"b".to_vec()], false);
        let (reply, ended) = s.run(&command(&["UNSUBSCRIBE", "a"]));
        assert_eq!(reply, b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n");
        assert!(!ended);
        let (_, ended) = s.run(&command(&["unsubscribe"]));
        assert!(ended);
    }

    #[test]
    fn push_mode_refuses_other_commands_and_answers_ping_as_redis_does() {
        let mut s = subscriber(false);
        s.add(&[b"a".to_vec()], false);
        let (reply, ended) = s.run(&command(&["GET", "k"]));
        assert!(reply.starts_with(b"-ERR Can't execute 'get'"));
        assert!(!ended);
        assert_eq!(
            s.run(&command(&["PING"])).0,
            b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
        );
        let mut s3 = subscriber(true);
        s3.add(&[b"a".to_vec()], false);
        assert_eq!(s3.run(&command(&["PING"])).0, b"+PONG\r\n");
        assert_eq!(s3.run(&command(&["QUIT"])), (b"+OK\r\n".to_vec(), true));
    }
}
